"""The broker fixture and etc/mosquitto.conf keep what routemqd's no-loss promise needs.

Every later integration test trusts that an acknowledged QoS 1 message for a
persistent session survives broker restarts and crashes and is never dropped
by a queue limit; these tests prove that against the real broker before
anything else relies on it.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import Broker
from tests.support.processes import tracked_pids

pytestmark = pytest.mark.timeout(120)

WAIT = 10.0  # upper bound for any single broker round trip
SESSION_EXPIRY = 3600  # MQTT 5 session expiry, long enough to outlive any test

PROTOCOLS = [
    pytest.param(MQTTProtocolVersion.MQTTv311, id="mqtt311"),
    pytest.param(MQTTProtocolVersion.MQTTv5, id="mqtt5"),
]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; never hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


class Client:
    """A paho client on its background loop, with bounded waits.

    ``persistent`` asks for a session that outlives the connection
    (clean_session=False for 3.1.1; clean_start=False plus a session expiry
    for MQTT 5), which is how routemqd workers connect.
    """

    def __init__(
        self,
        broker: Broker,
        client_id: str,
        *,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
        persistent: bool = False,
    ) -> None:
        self.broker = broker
        self.protocol = protocol
        self.persistent = persistent
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.session_present: bool | None = None
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._connect_reason: Any = None
        self._subacks: dict[int, list[Any]] = {}
        self._suback = threading.Condition()
        self._mqtt = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if protocol == MQTTProtocolVersion.MQTTv5 else not persistent,
            reconnect_on_failure=False,
        )
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_disconnect = self._on_disconnect
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_message = self._on_message

    # paho callbacks, run on the client's network thread

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self.session_present = bool(flags.session_present)
        self._connect_reason = reason
        self._connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        self._disconnected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        with self._suback:
            self._subacks[mid] = reasons
            self._suback.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    # test-facing API

    def connect(self) -> bool:
        """Connect and return the broker's session-present flag."""
        host, port = self.broker.address
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY if self.persistent else 0
            self._mqtt.connect(
                host, port, keepalive=30, clean_start=not self.persistent, properties=props
            )
        else:
            self._mqtt.connect(host, port, keepalive=30)
        self._mqtt.loop_start()
        assert self._connected.wait(WAIT), "no CONNACK"
        assert not self._connect_reason.is_failure, f"connect refused: {self._connect_reason}"
        assert self.session_present is not None
        return self.session_present

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK granting ``qos``."""
        result, mid = self._mqtt.subscribe(topic, qos=qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._suback:
            assert self._suback.wait_for(lambda: mid in self._subacks, WAIT), "no SUBACK"
            reasons = self._subacks[mid]
        assert [int(r.value) for r in reasons] == [qos], reasons

    def publish_all(self, topic: str, payloads: list[bytes], qos: int = 1) -> None:
        """Publish and wait until the broker has acknowledged every message."""
        infos = [self._mqtt.publish(topic, payload, qos=qos) for payload in payloads]
        deadline = time.monotonic() + WAIT + len(payloads) / 100
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            assert info.is_published(), f"no PUBACK for mid {info.mid}"

    def receive(self, count: int, timeout: float = WAIT) -> list[bytes]:
        """Return the first ``count`` payloads, failing after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        payloads: list[bytes] = []
        while len(payloads) < count:
            remaining = deadline - time.monotonic()
            try:
                payloads.append(self.messages.get(timeout=max(0.0, remaining)).payload)
            except queue.Empty:
                pytest.fail(f"received {len(payloads)} of {count} messages in {timeout} s")
        return payloads

    def disconnect(self) -> None:
        """Send DISCONNECT and stop the network loop."""
        self._mqtt.disconnect()
        self._disconnected.wait(WAIT)
        self._mqtt.loop_stop()

    def close(self) -> None:
        """Best-effort cleanup for a client a failed test left connected."""
        if self._connected.is_set() and not self._disconnected.is_set():
            self._mqtt.disconnect()
        self._mqtt.loop_stop()


@pytest.fixture
def clients() -> Any:
    """Make :class:`Client` objects that are closed even when the test fails."""
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        client = Client(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def park_persistent_subscriber(
    broker: Broker, clients: Any, client_id: str, topic: str, protocol: MQTTProtocolVersion
) -> None:
    """Create a persistent session subscribed to ``topic`` and go offline."""
    sub = clients(broker, client_id, protocol=protocol, persistent=True)
    sub.connect()
    sub.subscribe(topic)
    sub.disconnect()


def publish(broker: Broker, clients: Any, topic: str, payloads: list[bytes]) -> None:
    pub = clients(broker, f"pub-{time.monotonic_ns()}")
    pub.connect()
    pub.publish_all(topic, payloads)
    pub.disconnect()


def resume(broker: Broker, clients: Any, client_id: str, protocol: MQTTProtocolVersion) -> Client:
    """Reconnect a persistent session and check the broker still had it."""
    sub = clients(broker, client_id, protocol=protocol, persistent=True)
    assert sub.connect(), f"session lost\n{broker.log_tail()}"
    return sub


def saved_to_disk(broker: Broker, payload: bytes) -> bool:
    """True once the broker's database file on disk holds ``payload``.

    Mosquitto logs "Saving in-memory database" before it writes, then writes ``mosquitto.db.new``
    and renames it over ``mosquitto.db``: the log line can come before the save is complete, the
    rename cannot. A message is stored once, in the snapshot that also holds the session queueing
    it, so a database file containing the payload is a complete save of both.
    """
    try:
        return payload in broker.db_path.read_bytes()
    except FileNotFoundError:
        return False


def test_publish_subscribe_qos1(broker: Broker, clients: Any) -> None:
    assert broker.running
    assert broker.port != 0
    assert broker.pid in tracked_pids()

    sub = clients(broker, "sub")
    sub.connect()
    sub.subscribe("fixture/hello")
    publish(broker, clients, "fixture/hello", [b"hello"])

    assert sub.receive(1) == [b"hello"]
    sub.disconnect()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_restart_keeps_queued_message(
    broker: Broker, clients: Any, protocol: MQTTProtocolVersion
) -> None:
    port = broker.port
    park_persistent_subscriber(broker, clients, "worker-1", "jobs/a", protocol)
    publish(broker, clients, "jobs/a", [b"queued while offline"])

    broker.restart()

    assert broker.port == port, "clients must find the broker where it was"
    sub = resume(broker, clients, "worker-1", protocol)
    assert sub.receive(1) == [b"queued while offline"]
    sub.disconnect()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kill9_after_autosave_keeps_session(
    broker: Broker, clients: Any, protocol: MQTTProtocolVersion
) -> None:
    interval = float(broker.setting("autosave_interval") or 0)
    assert 0 < interval <= 5, "a long autosave interval loses messages on a crash"
    park_persistent_subscriber(broker, clients, "worker-1", "jobs/a", protocol)
    payload = b"survives a crash"
    assert not saved_to_disk(broker, payload)
    publish(broker, clients, "jobs/a", [payload])

    # The message is in the broker's memory once PUBACK arrives; wait until an autosave has
    # put it in the database file (the log line alone comes before the write is done).
    assert wait_until(lambda: saved_to_disk(broker, payload), 3 * interval + 2), (
        f"no autosave with the message within {3 * interval + 2} s\n{broker.log_tail()}"
    )
    old_pid = broker.pid
    assert old_pid is not None
    broker.kill()
    assert broker.pid is None
    assert not psutil.pid_exists(old_pid)

    broker.start()

    sub = resume(broker, clients, "worker-1", protocol)
    assert sub.receive(1) == [b"survives a crash"]
    sub.disconnect()


def test_stop_leaves_no_process(broker: Broker) -> None:
    pid = broker.pid
    assert pid is not None
    host, port = broker.address

    broker.stop()

    assert broker.pid is None
    assert not broker.running
    assert not psutil.pid_exists(pid)
    assert pid not in tracked_pids()
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
        pass
    broker.stop()  # idempotent: teardown may call it again


def test_factory_brokers_are_independent(broker_factory: Any) -> None:
    first, second = broker_factory(), broker_factory()
    assert first.port != second.port
    assert first.workdir != second.workdir
    first.stop()
    assert second.running


def test_offline_queue_is_not_capped_at_1000(broker: Broker, clients: Any) -> None:
    """mosquitto's default max_queued_messages of 1000 drops the rest silently."""
    count = 1500
    park_persistent_subscriber(
        broker, clients, "slow-worker", "jobs/bulk", MQTTProtocolVersion.MQTTv311
    )
    publish(broker, clients, "jobs/bulk", [str(i).encode() for i in range(count)])

    sub = resume(broker, clients, "slow-worker", MQTTProtocolVersion.MQTTv311)
    received = sub.receive(count, timeout=60)
    sub.disconnect()

    assert sorted(int(p) for p in received) == list(range(count))
    assert "dropped" not in broker.log_tail(10_000)
