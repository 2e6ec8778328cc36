"""A publisher that numbers every message and remembers which ones the broker acknowledged.

"Lost" in these tests means: the broker PUBACKed the publish, but no handler ever recorded it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import ledger


def published(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged it. paho raises from ``is_published()`` for a message
    published while disconnected, although it queues it and sends it after reconnecting."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return bool(info._published)  # set when the PUBACK arrives


def client(
    host: str, port: int, client_id: str = "", protocol: int = 5, clean: bool = True
) -> mqtt.Client:
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311,
        clean_session=None if protocol == 5 else clean,
    )
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    return c


class Publisher:
    """Publishes ``<id>`` payloads (or what ``payload_for`` says) and knows which were PUBACKed."""

    def __init__(
        self,
        host: str,
        port: int,
        topic_for: Callable[[int], str],
        qos: int = 1,
        payload_for: Callable[[int], str] | None = None,
        start_id: int = 0,
    ) -> None:
        self.topic_for = topic_for
        self.payload_for = payload_for or str
        self.qos = qos
        self.next_id = start_id
        self.infos: list[tuple[str, mqtt.MQTTMessageInfo]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client = client(host, port)
        self.client.connect(host, port, 30)
        self.client.loop_start()

    @property
    def published(self) -> list[str]:
        return [ident for ident, _ in self.infos]

    @property
    def acked(self) -> set[str]:
        """Ids the broker acknowledged: the ones it promised to deliver."""
        return {ident for ident, info in list(self.infos) if published(info)}

    def publish_one(self) -> str:
        i = self.next_id
        self.next_id += 1
        ident = str(i)
        info = self.client.publish(self.topic_for(i), self.payload_for(i), qos=self.qos)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos > 0:
            # paho keeps it queued and sends it after reconnecting; PUBACK still marks it
            info.rc = mqtt.MQTT_ERR_SUCCESS
        self.infos.append((ident, info))
        return ident

    def publish_many(self, n: int) -> None:
        for _ in range(n):
            self.publish_one()

    def start(self, rate: float) -> None:
        """Publish at ``rate`` messages/s in a thread until stop()."""

        def loop() -> None:
            interval = 1.0 / rate
            t = time.monotonic()
            while not self._stop.is_set():
                self.publish_one()
                t += interval
                delay = t - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def wait_acked(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = sum(1 for _, info in list(self.infos) if not published(info))
            if not pending:
                return
            time.sleep(0.05)
        raise AssertionError(f"{pending} publishes never acknowledged by the broker")

    def close(self) -> None:
        self.stop()
        self.client.disconnect()
        self.client.loop_stop()


def wait_handled(path: Path, expected: set[str], timeout: float = 60) -> set[str]:
    """Wait until every expected id is in the ledger; return the missing ones (empty = all)."""
    deadline = time.monotonic() + timeout
    missing = set(expected)
    while time.monotonic() < deadline:
        missing = expected - ledger.handled_ids(path)
        if not missing:
            return set()
        time.sleep(0.1)
    return missing


class Subscriber:
    """A plain subscriber (clean session) that collects every message it receives."""

    def __init__(
        self, host: str, port: int, topic: str, protocol: int = 5, timeout: float = 10
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = client(host, port, protocol=protocol)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect(host, port, 30)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        if not self._subscribed.wait(timeout):
            self.close()
            raise AssertionError(f"no SUBACK for {topic!r} within {timeout}s")

    def collect(self, count: int, timeout: float = 10) -> list[mqtt.MQTTMessage]:
        """Exactly ``count`` messages within ``timeout`` s, or fewer if they do not come."""
        deadline = time.monotonic() + timeout
        out: list[mqtt.MQTTMessage] = []
        while len(out) < count:
            try:
                out.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def session_present(host: str, port: int, client_id: str, timeout: float = 10) -> bool:
    """Connect as ``client_id`` (MQTT 5, clean_start=False), report the broker's session-present
    flag, and leave without keeping a session."""
    result: queue.Queue[bool] = queue.Queue()
    c = client(host, port, client_id=client_id)
    c.on_connect = lambda _c, _u, flags, _rc, _p: result.put(bool(flags.session_present))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect(host, port, 30, clean_start=False, properties=props)
    c.loop_start()
    try:
        return result.get(timeout=timeout)
    finally:
        c.disconnect()
        c.loop_stop()
