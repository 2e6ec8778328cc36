"""Tests for routemqd.plan: slot client ids, which carry a route's session identity."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from routemqd.manifest import Manifest, loads
from routemqd.plan import client_id, slots_for, subscription_digest

CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def manifest(
    route: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    **top: Any,
) -> Manifest:
    base_route: dict[str, Any] = {
        "name": "sensors",
        "topic": "sensors/{id}/data",
        "handler": "app.handlers:handle",
        "shared": True,
        "workers": 3,
        "qos": 1,
    }
    base_route.update(route or {})
    doc: dict[str, Any] = {
        "host_id": "host-a",
        "group": "routemq",
        "broker": {"client_id_prefix": "routemq", "protocol": 5, **(broker or {})},
        "routes": [base_route],
        **top,
    }
    return loads(yaml.safe_dump(doc), "<plan>", environ={})


def ids(m: Manifest) -> list[str]:
    return [spec.client_id for spec in slots_for(m).values()]


def test_client_ids_are_deterministic() -> None:
    assert ids(manifest()) == ids(manifest())
    m = manifest()
    r = m.routes[0]
    assert client_id(m, r, 0) == client_id(m, r, 0)


def test_client_id_layout() -> None:
    m = manifest()
    r = m.routes[0]
    digest = subscription_digest(r, m.broker)
    assert re.fullmatch(r"[0-9a-f]{6}", digest)
    assert client_id(m, r, 2) == f"routemq-host-a-sensors-2-{digest}"


def test_client_ids_differ_per_slot() -> None:
    got = ids(manifest())
    assert len(got) == 3
    assert len(set(got)) == 3


def test_client_ids_differ_per_route() -> None:
    m = manifest()
    other = loads(
        yaml.safe_dump(
            {
                "host_id": "host-a",
                "routes": [
                    {"name": "sensors", "topic": "sensors/{id}/data", "handler": "a:b"},
                    {"name": "sensors2", "topic": "sensors/{id}/data", "handler": "a:b"},
                ],
            }
        ),
        "<plan>",
    )
    a, b = other.routes
    assert client_id(other, a, 0) != client_id(other, b, 0)
    assert client_id(m, m.routes[0], 0) != client_id(other, b, 0)


def test_client_ids_differ_per_host() -> None:
    a = manifest(host_id="host-a")
    b = manifest(host_id="host-b")
    assert set(ids(a)).isdisjoint(ids(b))


def test_client_ids_differ_per_prefix() -> None:
    assert set(ids(manifest())).isdisjoint(ids(manifest(broker={"client_id_prefix": "other"})))


@pytest.mark.parametrize(
    ("route", "broker", "top"),
    [
        ({"topic": "sensors/{id}/temp"}, {}, {}),
        ({"topic": "sensors/+/data/#"}, {}, {}),
        ({"qos": 0}, {}, {}),
        ({"group": "other-group"}, {}, {}),
        ({}, {}, {"group": "other-group"}),
        ({}, {"protocol": "3.1.1"}, {}),
    ],
    ids=["topic", "topic-wildcard", "qos", "route-group", "manifest-group", "protocol"],
)
def test_subscription_changes_change_the_client_id(
    route: dict[str, Any], broker: dict[str, Any], top: dict[str, Any]
) -> None:
    before = ids(manifest())
    after = ids(manifest(route=route, broker=broker, **top))
    assert len(after) == len(before)
    assert set(before).isdisjoint(after)


@pytest.mark.parametrize(
    "route",
    [
        {"handler": "other.module:other_func"},
        {"concurrency": 16},
        {"prefetch": 2},
        {"max_memory": "2GiB"},
        {"heartbeat_timeout": "5m"},
        {"dead_letter_topic": "dead/letters"},
        {"qos": 2},
    ],
    ids=["handler", "concurrency", "prefetch", "max_memory", "heartbeat", "dead-letters", "qos2"],
)
def test_non_subscription_changes_keep_the_client_id(route: dict[str, Any]) -> None:
    # qos 2 is subscribed as qos 1, so the broker sees the same subscription as with qos 1.
    assert ids(manifest(route=route)) == ids(manifest())


def test_group_is_irrelevant_for_a_non_shared_route() -> None:
    plain: dict[str, Any] = {"shared": False, "workers": 1}
    assert ids(manifest(route=plain)) == ids(manifest(route=plain, group="other"))


def test_fewer_workers_keep_the_remaining_ids() -> None:
    three = ids(manifest())
    two = ids(manifest(route={"workers": 2}))
    assert two == three[:2]


@pytest.mark.parametrize(
    "topic",
    ["température/+/données", "a/#", "+/+/#", "$SYS/broker/load/#", "x y/{id}/z"],
)
def test_client_ids_use_only_safe_characters(topic: str) -> None:
    doc = {"routes": [{"topic": topic, "handler": "m:f", "shared": True, "workers": 2}]}
    m = loads(yaml.safe_dump(doc, allow_unicode=True), "<plan>")
    for cid in ids(m):
        assert CLIENT_ID_RE.match(cid), cid


def test_slots_carry_the_manifest_context() -> None:
    m = manifest(python_path=["/srv/app"], supervisor={"graceful_timeout": "7s"})
    slots = slots_for(m)
    assert list(slots) == [("sensors", 0), ("sensors", 1), ("sensors", 2)]
    spec = slots[("sensors", 1)]
    assert spec.key == ("sensors", 1)
    assert spec.label == "sensors[1]"
    assert spec.index == 1
    assert spec.route is m.routes[0]
    assert spec.broker is m.broker
    assert spec.python_path == ("/srv/app",)
    assert spec.host_id == "host-a"
    assert spec.graceful_timeout == 7.0
    assert spec.manifest_path == "<plan>"
