"""From a Manifest to the slots that should run, and from two Manifests to what must change.

A slot's identity is its client id: prefix, host, route, index and a short digest of the
subscription. Changing the topic, QoS or group therefore changes the id, which is exactly the
rule the broker needs (a new subscription is a new session; the old session must be retired, not
resumed). Changing only the handler keeps the id, so a replacement inherits the session and
everything the broker queued for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from routemqd.manifest import BrokerConfig, Manifest, Route


@dataclass(frozen=True)
class SlotSpec:
    """Everything a worker needs to run one slot. Forked into the worker as it is."""

    route: Route
    index: int
    client_id: str
    broker: BrokerConfig
    python_path: tuple[str, ...]
    host_id: str
    graceful_timeout: float
    manifest_path: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str, int]:
        return (self.route.name, self.index)

    @property
    def label(self) -> str:
        return f"{self.route.name}[{self.index}]"


def subscription_digest(route: Route, broker: BrokerConfig) -> str:
    """Short, stable digest of what makes a session: filter (with group), QoS and protocol."""
    text = f"{route.subscription}\0{route.subscribe_qos}\0{broker.protocol}"
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def client_id(manifest: Manifest, route: Route, index: int) -> str:
    raw = "-".join(
        (
            manifest.broker.client_id_prefix,
            manifest.host_id,
            route.name,
            str(index),
            subscription_digest(route, manifest.broker),
        )
    )
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)


def slot_spec(manifest: Manifest, route: Route, index: int) -> SlotSpec:
    """One slot of a route. The scaler adds slots one index at a time with this."""
    return SlotSpec(
        route=route,
        index=index,
        client_id=client_id(manifest, route, index),
        broker=manifest.broker,
        python_path=manifest.python_path,
        host_id=manifest.host_id,
        graceful_timeout=manifest.supervisor.graceful_timeout,
        manifest_path=manifest.path,
    )


@dataclass(frozen=True)
class PoolPlan:
    """What the manifest says about one pool's size. A fixed pool has min == max == initial."""

    route: str
    min: int
    max: int
    autoscaled: bool

    @property
    def initial(self) -> int:
        """A new autoscaled pool starts small: the scaler grows it once load shows it is needed."""
        return self.min

    def clamp(self, count: int) -> int:
        return max(self.min, min(self.max, count))


def pool_plan(route: Route) -> PoolPlan:
    return PoolPlan(route.name, route.min_workers, route.max_workers, route.autoscaled)


def pools_for(manifest: Manifest) -> dict[str, PoolPlan]:
    return {r.name: pool_plan(r) for r in manifest.routes}


def pool_size(route: Route, running: Mapping[str, int] | None = None) -> int:
    """How many slots a pool should have: a fixed pool its number; an autoscaled pool what it runs
    now (the scaler's target, passed in by the master) held inside the manifest's range, so a
    reload that changes min or max keeps the slots that still fit and restarts none of them."""
    plan = pool_plan(route)
    if not plan.autoscaled:
        return plan.min
    current = (running or {}).get(route.name)
    return plan.initial if current is None else plan.clamp(current)


def slots_for(
    manifest: Manifest, running: Mapping[str, int] | None = None
) -> dict[tuple[str, int], SlotSpec]:
    """The desired slots, keyed by (route name, index), in manifest order.

    ``running`` maps an autoscaled route to the count it runs now (see ``pool_size``); without it
    every pool gets its initial size, which is what startup and ``check`` want.
    """
    out: dict[tuple[str, int], SlotSpec] = {}
    for route in manifest.routes:
        for index in range(pool_size(route, running)):
            spec = slot_spec(manifest, route, index)
            out[spec.key] = spec
    return out


def resize(
    current: Mapping[tuple[str, int], SlotSpec], manifest: Manifest, route_name: str, target: int
) -> list[Change]:
    """The scaler's step as slot changes: start the lowest free indices, retire the highest.

    Keeping indices dense (0..n-1) keeps client ids predictable, and retiring from the top means
    slot 0, the one every pool has, is never the one removed. A retired index that comes back
    later starts a fresh session: retiring ended the old one.
    """
    route = manifest.route(route_name)
    held = sorted(i for (name, i) in current if name == route_name)
    changes: list[Change] = []
    if target > len(held):
        taken = set(held)
        free = (i for i in itertools.count() if i not in taken)
        for _ in range(target - len(held)):
            index = next(free)
            spec = slot_spec(manifest, route, index)
            changes.append(Change((route_name, index), "start", None, spec))
    else:
        for index in reversed(held[target:]):
            key = (route_name, index)
            changes.append(Change(key, "retire", current[key], None))
    return changes


@dataclass(frozen=True)
class Change:
    """One slot's fate in a reload: keep, start, retire, or replace (same or new session)."""

    key: tuple[str, int]
    action: str  # keep | start | retire | replace-session | replace-fresh
    old: SlotSpec | None
    new: SlotSpec | None


def runtime_view(spec: SlotSpec) -> SlotSpec:
    """The part of a spec a running worker depends on. The pool size, its range and scaling knobs,
    and the master's timeouts are not: scaling a pool must not restart the slots it keeps."""
    return dataclasses.replace(
        spec,
        route=dataclasses.replace(spec.route, workers=0, scaling=None),
        graceful_timeout=0.0,
    )


def diff(
    current: dict[tuple[str, int], SlotSpec], desired: dict[tuple[str, int], SlotSpec]
) -> list[Change]:
    """Compare what runs with what the new manifest wants, slot by slot.

    Compared against the specs that actually run (not the previous manifest), so a replace that
    was refused earlier (new handler failed to import) is tried again on the next reload.
    """
    changes: list[Change] = []
    for key, new in desired.items():
        old = current.get(key)
        if old is None:
            changes.append(Change(key, "start", None, new))
        elif runtime_view(old) == runtime_view(new):
            changes.append(Change(key, "keep", old, new))
        elif old.client_id == new.client_id:
            changes.append(Change(key, "replace-session", old, new))
        else:
            changes.append(Change(key, "replace-fresh", old, new))
    for key, old in current.items():
        if key not in desired:
            changes.append(Change(key, "retire", old, None))
    return changes


def summarize(changes: list[Change]) -> dict[str, list[str]]:
    """Per-route verbs for the one reload log event: kept, started, retired, scaled, replaced."""
    by_route: dict[str, set[str]] = {}
    for c in changes:
        by_route.setdefault(c.key[0], set()).add(c.action)
    out: dict[str, list[str]] = {
        "kept": [],
        "started": [],
        "retired": [],
        "scaled": [],
        "replaced": [],
    }
    for route, actions in by_route.items():
        if actions == {"keep"}:
            out["kept"].append(route)
        elif actions == {"start"}:
            out["started"].append(route)
        elif actions == {"retire"}:
            out["retired"].append(route)
        elif actions & {"replace-session", "replace-fresh"}:
            out["replaced"].append(route)
        else:
            out["scaled"].append(route)
    return out
