"""Tests for autoscaled pools in routemqd.plan: pool sizes from a range, the scaler's resize step,
and reloads that change min/max or switch between a number and a range without restarting the
slots that stay."""

from __future__ import annotations

from typing import Any

import yaml

from routemqd.manifest import Manifest, loads
from routemqd.plan import (
    Change,
    PoolPlan,
    diff,
    pool_size,
    pools_for,
    resize,
    runtime_view,
    slots_for,
)


def route(name: str = "sensors", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "topic": f"{name}/{{id}}",
        "handler": "app.handlers:handle",
        "shared": True,
        "workers": {"min": 1, "max": 8},
    }
    base.update(kw)
    return base


def manifest(*routes: dict[str, Any]) -> Manifest:
    doc = {"host_id": "host-a", "routes": list(routes) or [route()]}
    return loads(yaml.safe_dump(doc), "/etc/routemq.yaml", environ={})


def actions(changes: list[Change]) -> dict[tuple[str, int], str]:
    return {c.key: c.action for c in changes}


def indices(slots: dict[tuple[str, int], Any], name: str = "sensors") -> list[int]:
    return [i for (n, i) in slots if n == name]


# ----------------------------------------------------------------------------- pool plans


def test_pool_plan_of_a_range_and_of_a_number() -> None:
    m = manifest(
        route("auto"), route("fixed", workers=3), route("ordered", shared=False, workers=1)
    )
    assert pools_for(m) == {
        "auto": PoolPlan("auto", 1, 8, True),
        "fixed": PoolPlan("fixed", 3, 3, False),
        "ordered": PoolPlan("ordered", 1, 1, False),
    }
    assert pools_for(m)["auto"].initial == 1
    assert pools_for(m)["fixed"].initial == 3


def test_clamp_holds_a_count_inside_the_range() -> None:
    p = PoolPlan("p", 2, 5, True)
    assert [p.clamp(n) for n in (0, 2, 4, 5, 9)] == [2, 2, 4, 5, 5]


def test_a_new_autoscaled_pool_starts_with_min_slots() -> None:
    m = manifest(route(workers={"min": 2, "max": 6}))
    assert indices(slots_for(m)) == [0, 1]


def test_pool_size_follows_what_runs_inside_the_range() -> None:
    r = manifest(route(workers={"min": 2, "max": 6})).routes[0]
    assert pool_size(r) == 2
    assert pool_size(r, {"sensors": 4}) == 4
    assert pool_size(r, {"sensors": 9}) == 6
    assert pool_size(r, {"sensors": 1}) == 2
    assert pool_size(r, {"other": 5}) == 2


def test_a_fixed_pool_ignores_the_running_count() -> None:
    r = manifest(route(workers=3)).routes[0]
    assert pool_size(r, {"sensors": 7}) == 3


# ------------------------------------------------------------------------------- resize


def test_resize_up_adds_the_next_index() -> None:
    m = manifest()
    current = slots_for(m, {"sensors": 2})
    changes = resize(current, m, "sensors", 3)
    assert actions(changes) == {("sensors", 2): "start"}
    (c,) = changes
    assert (
        c.new is not None
        and c.new.client_id == slots_for(m, {"sensors": 3})[("sensors", 2)].client_id
    )


def test_resize_down_retires_the_highest_index_first() -> None:
    m = manifest()
    current = slots_for(m, {"sensors": 4})
    changes = resize(current, m, "sensors", 2)
    assert [c.key for c in changes] == [("sensors", 3), ("sensors", 2)]
    assert all(c.action == "retire" and c.old is current[c.key] for c in changes)


def test_resize_fills_a_gap_before_appending() -> None:
    m = manifest()
    current = slots_for(m, {"sensors": 3})
    del current[("sensors", 1)]  # e.g. still retiring under another key
    assert actions(resize(current, m, "sensors", 4)) == {
        ("sensors", 1): "start",
        ("sensors", 3): "start",
    }


def test_resize_to_the_same_count_changes_nothing() -> None:
    m = manifest()
    assert resize(slots_for(m, {"sensors": 3}), m, "sensors", 3) == []


def test_resize_leaves_other_pools_alone() -> None:
    m = manifest(route("a"), route("b"))
    current = slots_for(m, {"a": 2, "b": 2})
    assert {c.key[0] for c in resize(current, m, "a", 1) + resize(current, m, "a", 3)} == {"a"}


# ------------------------------------------------------------------------------- reload


def fates(
    keep: range = range(0), start: range = range(0), retire: range = range(0)
) -> dict[tuple[str, int], str]:
    out = {("sensors", i): "keep" for i in keep}
    out.update({("sensors", i): "start" for i in start})
    out.update({("sensors", i): "retire" for i in retire})
    return out


def reload(old: Manifest, new: Manifest, running: int) -> dict[tuple[str, int], str]:
    current = slots_for(old, {"sensors": running})
    return actions(diff(current, slots_for(new, {"sensors": running})))


def test_changing_min_and_max_inside_the_count_keeps_every_slot() -> None:
    old = manifest(route(workers={"min": 1, "max": 8}))
    new = manifest(route(workers={"min": 2, "max": 6}))
    assert reload(old, new, 4) == fates(keep=range(4))


def test_a_lower_max_retires_down_to_it_and_keeps_the_rest() -> None:
    old = manifest(route(workers={"min": 1, "max": 8}))
    new = manifest(route(workers={"min": 1, "max": 2}))
    assert reload(old, new, 5) == fates(keep=range(2), retire=range(2, 5))


def test_a_higher_min_grows_the_pool() -> None:
    old = manifest(route(workers={"min": 1, "max": 8}))
    new = manifest(route(workers={"min": 3, "max": 8}))
    assert reload(old, new, 1) == fates(keep=range(1), start=range(1, 3))


def test_number_to_range_keeps_the_slots_that_fit() -> None:
    old = manifest(route(workers=4))
    new = manifest(route(workers={"min": 1, "max": 3}))
    assert reload(old, new, 4) == fates(keep=range(3), retire=range(3, 4))


def test_range_to_number_sets_the_fixed_count_keeping_the_slots_that_stay() -> None:
    old = manifest(route(workers={"min": 1, "max": 8}))
    new = manifest(route(workers=2))
    assert reload(old, new, 5) == fates(keep=range(2), retire=range(2, 5))
    assert reload(old, new, 1) == fates(keep=range(1), start=range(1, 2))


def test_changing_only_the_knobs_keeps_every_slot() -> None:
    old = manifest(route())
    new = manifest(route(scaling={"up_after": "1s", "busy_low": "20%"}))
    assert reload(old, new, 3) == fates(keep=range(3))


def test_runtime_view_ignores_the_range_and_the_knobs() -> None:
    a = slots_for(manifest(route()))[("sensors", 0)]
    b = slots_for(manifest(route(workers=5)))[("sensors", 0)]
    c = slots_for(manifest(route(workers={"min": 1, "max": 2}, scaling={"up_after": 9})))
    assert runtime_view(a) == runtime_view(b) == runtime_view(c[("sensors", 0)])
    assert a.client_id == b.client_id  # the session identity does not depend on the pool size
