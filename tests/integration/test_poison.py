"""A message that kills its worker every time must not crash-loop the slot forever."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.support import ledger, manifests
from tests.support.broker import Broker
from tests.support.traffic import Publisher, client, wait_handled


def _collect(broker: Broker, topic: str) -> tuple[mqtt.Client, list[mqtt.MQTTMessage]]:
    got: list[mqtt.MQTTMessage] = []
    ready = threading.Event()
    c = client(*broker.address)
    c.on_message = lambda _c, _u, m: got.append(m)
    c.on_subscribe = lambda *_a: ready.set()
    c.connect(*broker.address, 30)
    c.loop_start()
    c.subscribe(topic, qos=1)
    assert ready.wait(10)
    return c, got


def test_worker_killer_is_dead_lettered_after_max_attempts(
    broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any]
) -> None:
    m = manifests.write(
        tmp_path / "m.yaml",
        broker.port,
        [manifests.route("p", "p/{n}", max_attempts=3, dead_letter_topic="dlq/p")],
        supervisor={"failure_limit": 10},
    )
    led = tmp_path / "ledger"
    daemon = daemon_factory(m, env={"ROUTEMQD_TEST_LEDGER": str(led)})
    daemon.wait_ready()
    dlq, dead = _collect(broker, "dlq/p")
    pub = Publisher(
        *broker.address,
        topic_for=lambda i: f"p/{i}",
        payload_for=lambda i: f"{i}:exit" if i == 0 else str(i),
    )
    pub.publish_many(20)
    pub.wait_acked()
    # everything after the poison message is handled: the slot was not stuck on it
    missing = wait_handled(led, {str(i) for i in range(1, 20)}, timeout=60)
    assert not missing
    assert "0" not in ledger.handled_ids(led)
    daemon.wait_for(lambda s: len(dead) >= 1, timeout=30, what="dead letter")
    assert dead[0].payload == b"0:exit"
    props = dict(dead[0].properties.UserProperty)
    assert props["original_topic"] == "p/0"
    assert "took down 3 workers" in props["error"]
    attempts = [e["attempts"] for e in daemon.events("message_attempt_failed")]
    assert attempts == [1, 2, 3]
    assert len(daemon.events("poison_message")) == 1
    assert daemon.slot("p", 0)["state"] == "ready"
    dlq.disconnect()
    dlq.loop_stop()
    pub.close()
