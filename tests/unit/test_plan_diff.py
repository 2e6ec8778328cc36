"""Tests for routemqd.plan.diff / summarize / runtime_view: what a reload changes, slot by slot."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml

from routemqd.manifest import Manifest, loads
from routemqd.plan import Change, SlotSpec, diff, runtime_view, slots_for, summarize


def route(name: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "topic": f"{name}/{{id}}",
        "handler": "app.handlers:handle",
        "shared": True,
        "workers": 3,
        "qos": 1,
    }
    base.update(kw)
    return base


def manifest(*routes: dict[str, Any], **top: Any) -> Manifest:
    doc: dict[str, Any] = {
        "host_id": "host-a",
        "broker": {"client_id_prefix": "routemq", "protocol": 5},
        "routes": list(routes) or [route("sensors")],
        **top,
    }
    return loads(yaml.safe_dump(doc), "/etc/routemq.yaml", environ={})


def actions(changes: list[Change]) -> dict[tuple[str, int], str]:
    return {c.key: c.action for c in changes}


def plan_diff(old: Manifest, new: Manifest) -> list[Change]:
    return diff(slots_for(old), slots_for(new))


# ----------------------------------------------------------------------------------- diff


def test_unchanged_manifest_keeps_every_slot() -> None:
    old = manifest(route("a"), route("b", shared=False, workers=1))
    new = manifest(route("a"), route("b", shared=False, workers=1))
    changes = plan_diff(old, new)
    assert actions(changes) == {
        ("a", 0): "keep",
        ("a", 1): "keep",
        ("a", 2): "keep",
        ("b", 0): "keep",
    }
    for c in changes:
        assert c.old is not None and c.new is not None
        assert c.old.client_id == c.new.client_id


def test_reordering_routes_and_moving_lines_keeps_every_slot() -> None:
    old = manifest(route("a"), route("b"))
    new = manifest(route("b"), route("a"), group="routemq")
    assert set(actions(plan_diff(old, new)).values()) == {"keep"}


def test_scale_down_keeps_slot_zero_and_retires_the_rest() -> None:
    changes = plan_diff(manifest(route("s", workers=3)), manifest(route("s", workers=1)))
    assert actions(changes) == {("s", 0): "keep", ("s", 1): "retire", ("s", 2): "retire"}
    retired = [c for c in changes if c.action == "retire"]
    assert all(c.new is None and c.old is not None for c in retired)
    kept = next(c for c in changes if c.action == "keep")
    assert kept.new is not None and kept.new.route.workers == 1


def test_scale_up_keeps_slot_zero_and_starts_the_new_slots() -> None:
    changes = plan_diff(manifest(route("s", workers=1)), manifest(route("s", workers=4)))
    assert actions(changes) == {
        ("s", 0): "keep",
        ("s", 1): "start",
        ("s", 2): "start",
        ("s", 3): "start",
    }
    started = [c for c in changes if c.action == "start"]
    assert all(c.old is None and c.new is not None for c in started)


def test_handler_change_replaces_every_slot_keeping_the_session() -> None:
    old = manifest(route("s"), route("other"))
    new = manifest(route("s", handler="app.handlers:handle_v2"), route("other"))
    changes = plan_diff(old, new)
    assert actions(changes) == {
        ("s", 0): "replace-session",
        ("s", 1): "replace-session",
        ("s", 2): "replace-session",
        ("other", 0): "keep",
        ("other", 1): "keep",
        ("other", 2): "keep",
    }
    for c in changes:
        assert c.old is not None and c.new is not None
        assert c.old.client_id == c.new.client_id
    replaced = [c for c in changes if c.key[0] == "s"]
    assert all(c.new.route.handler == "app.handlers:handle_v2" for c in replaced)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "change",
    [{"concurrency": 4}, {"prefetch": 2}, {"heartbeat_timeout": "5m"}, {"qos": 2}],
    ids=["concurrency", "prefetch", "heartbeat", "qos2"],
)
def test_worker_settings_replace_keeping_the_session(change: dict[str, Any]) -> None:
    changes = plan_diff(manifest(route("s")), manifest(route("s", **change)))
    assert set(actions(changes).values()) == {"replace-session"}


@pytest.mark.parametrize(
    "change",
    [{"topic": "elsewhere/{id}"}, {"qos": 0}, {"group": "other-group"}],
    ids=["topic", "qos", "group"],
)
def test_subscription_change_replaces_with_a_fresh_session(change: dict[str, Any]) -> None:
    changes = plan_diff(manifest(route("s")), manifest(route("s", **change)))
    assert set(actions(changes).values()) == {"replace-fresh"}
    for c in changes:
        assert c.old is not None and c.new is not None
        assert c.old.client_id != c.new.client_id


def test_topic_change_while_scaling_down() -> None:
    changes = plan_diff(
        manifest(route("s", workers=3)), manifest(route("s", topic="t2/{id}", workers=2))
    )
    assert actions(changes) == {
        ("s", 0): "replace-fresh",
        ("s", 1): "replace-fresh",
        ("s", 2): "retire",
    }


def test_new_and_deleted_routes_start_and_retire() -> None:
    old = manifest(route("keep"), route("gone", workers=2))
    new = manifest(route("keep"), route("fresh", shared=False, workers=1))
    changes = plan_diff(old, new)
    assert actions(changes) == {
        ("keep", 0): "keep",
        ("keep", 1): "keep",
        ("keep", 2): "keep",
        ("fresh", 0): "start",
        ("gone", 0): "retire",
        ("gone", 1): "retire",
    }


def test_graceful_timeout_change_keeps_every_slot() -> None:
    old = manifest(route("a"), supervisor={"graceful_timeout": "10s"})
    new = manifest(route("a"), supervisor={"graceful_timeout": "45s"})
    changes = plan_diff(old, new)
    assert set(actions(changes).values()) == {"keep"}
    # the kept slots carry the new settings for the master
    assert all(c.new is not None and c.new.graceful_timeout == 45.0 for c in changes)


def test_supervisor_and_logging_changes_keep_every_slot() -> None:
    old = manifest(route("a"))
    new = manifest(
        route("a"),
        supervisor={"health_interval": "1s", "failure_limit": 9},
        logging={"level": "debug"},
    )
    assert set(actions(plan_diff(old, new)).values()) == {"keep"}


def test_host_id_change_replaces_with_fresh_sessions() -> None:
    changes = plan_diff(manifest(route("a")), manifest(route("a"), host_id="host-b"))
    assert set(actions(changes).values()) == {"replace-fresh"}


def test_diff_compares_with_what_runs_not_with_the_previous_manifest() -> None:
    # A replace refused earlier (new handler failed to import) leaves the old spec running:
    # reloading the same new manifest again must try the replace again.
    running = slots_for(manifest(route("s")))
    wanted = slots_for(manifest(route("s", handler="app.handlers:fixed")))
    assert set(actions(diff(running, wanted)).values()) == {"replace-session"}
    assert set(actions(diff(wanted, wanted)).values()) == {"keep"}


def test_diff_lists_desired_slots_in_order_then_retired_ones() -> None:
    old = manifest(route("gone", workers=1), route("a", workers=2))
    new = manifest(route("a", workers=2), route("b", workers=1))
    assert [c.key for c in plan_diff(old, new)] == [("a", 0), ("a", 1), ("b", 0), ("gone", 0)]


def test_empty_current_starts_everything() -> None:
    changes = diff({}, slots_for(manifest(route("a", workers=2))))
    assert actions(changes) == {("a", 0): "start", ("a", 1): "start"}


# ---------------------------------------------------------------------------- runtime_view


def _spec(m: Manifest, key: tuple[str, int]) -> SlotSpec:
    return slots_for(m)[key]


def test_runtime_view_ignores_pool_size_and_master_timeouts() -> None:
    a = _spec(manifest(route("s", workers=3), supervisor={"graceful_timeout": "5s"}), ("s", 0))
    b = _spec(manifest(route("s", workers=7), supervisor={"graceful_timeout": "50s"}), ("s", 0))
    assert a != b
    assert runtime_view(a) == runtime_view(b)


def test_runtime_view_ignores_the_manifest_path_and_route_line() -> None:
    a = _spec(manifest(route("s")), ("s", 0))
    moved = dataclasses.replace(
        a, manifest_path="/elsewhere.yaml", route=dataclasses.replace(a.route, line=99)
    )
    assert runtime_view(a) == runtime_view(moved)


def test_runtime_view_sees_what_the_worker_runs() -> None:
    base = _spec(manifest(route("s")), ("s", 0))
    for change in ({"handler": "x.y:z"}, {"topic": "other/#"}, {"concurrency": 2}):
        other = _spec(manifest(route("s", **change)), ("s", 0))
        assert runtime_view(base) != runtime_view(other), change
    broker = _spec(
        loads(
            yaml.safe_dump(
                {
                    "host_id": "host-a",
                    "broker": {"client_id_prefix": "routemq", "protocol": 5, "keepalive": 60},
                    "routes": [route("s")],
                }
            ),
            "/etc/routemq.yaml",
            environ={},
        ),
        ("s", 0),
    )
    assert runtime_view(base) != runtime_view(broker)


def test_runtime_view_does_not_change_the_spec() -> None:
    spec = _spec(manifest(route("s", workers=3)), ("s", 1))
    view = runtime_view(spec)
    assert spec.route.workers == 3
    assert view.route.workers == 0
    assert view.client_id == spec.client_id
    assert view.key == spec.key


# ------------------------------------------------------------------------------ summarize


def test_summary_of_an_unchanged_reload_keeps_every_route() -> None:
    m = manifest(route("a"), route("b", workers=1))
    assert summarize(plan_diff(m, m)) == {
        "kept": ["a", "b"],
        "started": [],
        "retired": [],
        "scaled": [],
        "replaced": [],
    }


def test_summary_names_each_route_once_with_its_verb() -> None:
    old = manifest(
        route("same"),
        route("down", workers=3),
        route("up", workers=1),
        route("code"),
        route("moved"),
        route("gone"),
    )
    new = manifest(
        route("same"),
        route("down", workers=1),
        route("up", workers=4),
        route("code", handler="app.handlers:v2"),
        route("moved", topic="moved2/{id}"),
        route("added"),
    )
    assert summarize(plan_diff(old, new)) == {
        "kept": ["same"],
        "started": ["added"],
        "retired": ["gone"],
        "scaled": ["down", "up"],
        "replaced": ["code", "moved"],
    }


def test_summary_counts_a_replace_with_a_resize_as_replaced() -> None:
    changes = plan_diff(
        manifest(route("s", workers=2)), manifest(route("s", workers=3, handler="a.b:c"))
    )
    assert actions(changes) == {
        ("s", 0): "replace-session",
        ("s", 1): "replace-session",
        ("s", 2): "start",
    }
    assert summarize(changes)["replaced"] == ["s"]


def test_summary_of_nothing_is_empty() -> None:
    assert summarize([]) == {"kept": [], "started": [], "retired": [], "scaled": [], "replaced": []}
