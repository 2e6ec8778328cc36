"""From a Manifest to the slots that should run, and from two Manifests to what must change.

A slot's identity is its client id: prefix, host, route, index and a short digest of the
subscription. Changing the topic, QoS or group therefore changes the id, which is exactly the
rule the broker needs (a new subscription is a new session; the old session must be retired, not
resumed). Changing only the handler keeps the id, so a replacement inherits the session and
everything the broker queued for it.
"""

from __future__ import annotations

import hashlib
import re
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


def slots_for(manifest: Manifest) -> dict[tuple[str, int], SlotSpec]:
    """The desired slots, keyed by (route name, index), in manifest order."""
    out: dict[tuple[str, int], SlotSpec] = {}
    for route in manifest.routes:
        for index in range(route.workers):
            spec = SlotSpec(
                route=route,
                index=index,
                client_id=client_id(manifest, route, index),
                broker=manifest.broker,
                python_path=manifest.python_path,
                host_id=manifest.host_id,
                graceful_timeout=manifest.supervisor.graceful_timeout,
                manifest_path=manifest.path,
            )
            out[spec.key] = spec
    return out
