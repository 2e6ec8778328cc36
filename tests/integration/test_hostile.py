"""Hostile input from untrusted publishers, through a real broker into a real daemon.

Payloads from empty to the broker's maximum packet size, bytes that are not UTF-8, topics with
every unusual-but-valid character, and MQTT 5 properties at their size limits: no worker crashes
(the PIDs stay the same), every message is handled or dead-lettered, and a burst of megabyte
messages leaves the worker's memory bounded.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import manifests, recorder, traffic
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.traffic import Subscriber

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
MAX_PACKET = 8 * MiB
RSS_LIMIT = 300 * MiB
ROUTE = "h"
DLQ = "dlq/h"

DaemonFactory = Callable[..., Daemon]
_instances = itertools.count()


@pytest.fixture(scope="module")
def big_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker that accepts packets up to MAX_PACKET bytes and refuses larger ones."""
    instance = Broker(
        workdir=tmp_path_factory.mktemp("hostile-broker"),
        extra_config=f"max_packet_size {MAX_PACKET}",
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


def max_payload(topic: str, protocol: int, properties: Properties | None = None) -> int:
    """The largest payload the broker accepts in a QoS 1 PUBLISH on ``topic``.

    Mosquitto 2.0 counts the packet as its first byte plus its remaining length (topic, packet
    id, properties, payload), leaving out the length field itself.
    """
    props = len(properties.pack()) if properties is not None else 1
    variable = 2 + len(topic.encode()) + 2 + (props if protocol == 5 else 0)
    return MAX_PACKET - 1 - variable


class Setup:
    def __init__(
        self,
        broker: Broker,
        tmp_path: Path,
        daemon_factory: DaemonFactory,
        protocol: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.broker = broker
        self.protocol = protocol
        self.record = tmp_path / "record.jsonl"
        m = manifests.write(
            tmp_path / "routemq.yaml",
            broker.port,
            [
                manifests.route(
                    ROUTE,
                    "h/{kind}/#",
                    handler="tests.support.recorder:record",
                    dead_letter_topic=DLQ,
                    prefetch=4,
                )
            ],
            protocol=5 if protocol == 5 else "3.1.1",
            host_id=f"hostile-{next(_instances)}",
        )
        self.dlq = Subscriber(*broker.address, DLQ, protocol=protocol)
        self.daemon = daemon_factory(m, env={recorder.ENV: str(self.record), **(env or {})})
        self.daemon.wait_ready()
        self.pids = self.daemon.pids()
        self.client = connected_client(broker, protocol)

    @property
    def worker_pid(self) -> int:
        pid = self.pids[(ROUTE, 0)]
        assert pid is not None
        return pid

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, properties: Properties | None = None
    ) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, (topic[:80], info.rc)
        return info

    def wait_acked(self, infos: list[mqtt.MQTTMessageInfo], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for info in infos:
            while not info.is_published():
                assert time.monotonic() < deadline, "the broker did not acknowledge a publish"
                info.wait_for_publish(0.2)

    def wait_seen(self, count: int, timeout: float = 60) -> list[recorder.Seen]:
        deadline = time.monotonic() + timeout
        seen = recorder.read(self.record)
        while len(seen) < count and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = recorder.read(self.record)
        assert len(seen) >= count, f"handler saw {len(seen)} of {count} messages"
        return seen

    def assert_unharmed(self) -> None:
        """Same worker, never disconnected, nothing died."""
        assert self.daemon.pids() == self.pids
        assert psutil.pid_exists(self.worker_pid)
        for event in ("worker_died", "worker_crashed", "disconnected", "worker_unhealthy"):
            assert self.daemon.events(event) == [], event

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.dlq.close()


def connected_client(broker: Broker, protocol: int) -> mqtt.Client:
    c = traffic.client(*broker.address, protocol=protocol)
    up = threading.Event()
    c.on_connect = lambda *_a: up.set()
    c.connect(*broker.address, 30)
    c.loop_start()
    assert up.wait(10), "publisher could not connect"
    return c


@pytest.fixture
def setup_factory(
    big_broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory
) -> Iterator[Callable[..., Setup]]:
    made: list[Setup] = []

    def make(protocol: int, env: dict[str, str] | None = None) -> Setup:
        s = Setup(big_broker, tmp_path, daemon_factory, protocol, env)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def dead_letters(
    s: Setup, count: int, timeout: float = 30
) -> dict[str, tuple[bytes, dict[str, str]]]:
    """``count`` dead letters by original topic: (original payload, metadata)."""
    out: dict[str, tuple[bytes, dict[str, str]]] = {}
    for letter in s.dlq.collect(count, timeout=timeout):
        if s.protocol == 5:
            meta = dict(letter.properties.UserProperty)
            out[meta["original_topic"]] = (letter.payload, meta)
        else:
            envelope = json.loads(letter.payload)
            payload = base64.b64decode(envelope.pop("payload_b64"))
            out[envelope["original_topic"]] = (payload, {k: str(v) for k, v in envelope.items()})
    assert len(out) == count, f"{len(out)} of {count} dead letters arrived"
    return out


# -------------------------------------------------------------------------------- payloads


INVALID_UTF8 = {
    "lone-continuation": b"\x80",
    "bad-pair": b"\xc3\x28",
    "overlong-slash": b"\xc0\xaf",
    "surrogate": b"\xed\xa0\x80",
    "beyond-unicode": b"\xf4\x90\x80\x80",
    "embedded": b'{"id": "ok\xff"}',
    "truncated": "ü".encode()[:1],
}


@pytest.mark.parametrize("protocol", [5, 4], ids=["mqtt5", "mqtt311"])
def test_payloads_from_empty_to_the_broker_maximum(
    setup_factory: Callable[..., Setup], protocol: int
) -> None:
    s = setup_factory(protocol)
    good: dict[str, bytes] = {
        "h/empty/p": b"",
        "h/one/p": b"\x00",
        "h/mib/p": b"m" * MiB,
        "h/max/p": b"",
    }
    good["h/max/p"] = b"M" * max_payload("h/max/p", protocol)
    bad: dict[str, bytes] = {f"h/bad-{name}/p": data for name, data in INVALID_UTF8.items()}
    bad["h/random-mib/p"] = b"\xff" + os.urandom(MiB - 1)
    if protocol == 5:
        # the dead letter of this one cannot carry its payload: it would exceed the maximum
        bad["h/bad-max/p"] = b"\xff" * max_payload("h/bad-max/p", protocol)
    messages = {**good, **bad}
    infos = [s.publish(topic, payload) for topic, payload in messages.items()]
    s.wait_acked(infos)

    seen = {r.topic: r for r in s.wait_seen(len(messages))}
    assert set(seen) == set(messages)
    for topic, payload in messages.items():
        r = seen[topic]
        assert (r.len, r.sha) == (len(payload), recorder.digest(payload)), topic
        assert r.params == {"kind": topic.split("/")[1]}
        assert r.utf8 is (topic in good)

    letters = dead_letters(s, len(bad))
    assert set(letters) == set(bad)
    for topic, (payload, meta) in letters.items():
        assert meta["route"] == ROUTE
        assert "PayloadError" in meta["error"] and "not valid utf-8" in meta["error"]
        if topic == "h/bad-max/p":
            assert payload == b""
            assert "maximum packet size" in meta["payload_omitted"]
            assert meta["payload_omitted"].startswith(f"{len(bad[topic])} bytes")
        else:
            assert payload == bad[topic], topic
    assert s.dlq.collect(1, timeout=0.5) == []  # nothing valid was dead-lettered

    slot = s.daemon.wait_for(
        lambda st: st["slots"][0]["handled"] + st["slots"][0]["failed"] == len(messages),
        timeout=10,
        what="counters",
    )["slots"][0]
    assert (slot["handled"], slot["failed"]) == (len(good), len(bad))
    s.assert_unharmed()


def test_one_byte_over_the_maximum_is_refused_by_the_broker_only(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory(5)
    rogue = traffic.client(*s.broker.address)
    up, down = threading.Event(), threading.Event()
    rogue.on_connect = lambda *_a: up.set()
    rogue.on_disconnect = lambda *_a: down.set()
    rogue.connect(*s.broker.address, 30)
    rogue.loop_start()
    try:
        assert up.wait(10)
        topic = "h/over/p"
        rogue.publish(topic, b"o" * (max_payload(topic, 5) + 1), qos=1)
        assert down.wait(20), "the broker accepted a packet over max_packet_size"
    finally:
        rogue.loop_stop()
    after = s.publish("h/after/p", b"after")
    s.wait_acked([after])
    (r,) = s.wait_seen(1)
    assert r.topic == "h/after/p"
    s.assert_unharmed()


def test_handler_publish_over_the_maximum_fails_the_message_not_the_worker(
    setup_factory: Callable[..., Setup],
) -> None:
    """The broker would drop the connection, and paho would resend the packet on every reconnect:
    the worker refuses the publish instead, so the handler fails and the message is dead-lettered
    (without its payload, which cannot fit either)."""
    s = setup_factory(5)
    topic = "h/echo-max/p"
    echo = _props(UserProperty=[("echo", "twice")])
    payload = b"E" * max_payload(topic, 5, echo)
    info = s.publish(topic, payload, properties=echo)
    s.wait_acked([info])
    (r,) = s.wait_seen(1)
    assert (r.topic, r.len, r.utf8) == (topic, len(payload), True)
    letters = dead_letters(s, 1)
    letter, meta = letters[topic]
    assert letter == b""
    assert "exceeds the broker's maximum packet size" in meta["error"]
    assert f"echo/{topic}" in meta["error"]
    assert meta["payload_omitted"].startswith(f"{len(payload)} bytes")
    after = s.publish("h/after/p", b"after")
    s.wait_acked([after])
    assert s.wait_seen(2)[-1].topic == "h/after/p"
    s.assert_unharmed()


# ---------------------------------------------------------------------------------- topics


UNUSUAL_TOPICS = [
    "h/space/with spaces/ and a trailing one ",
    "h/unicode/ünïcødé/漢字/🚀",
    "h/dollar/a$b/$c/$",
    "h/dots/./../.hidden.",
    "h/brackets/(x)/[y]/{z}/<w>",
    "h/empty-levels//a//",
    "h/quotes/\"'`\\",
    "h/format/%s%n%x{0}",
    "h/invisible/\u00a0\u200b\ufeff",
    "h/rtl/\u202eevil",
    "h/long/" + "x" * 60_000,
    "h/deep/" + "/".join(str(i) for i in range(198)),  # 200 levels: mosquitto's limit
    "h/",
]


@pytest.mark.parametrize("protocol", [5, 4], ids=["mqtt5", "mqtt311"])
def test_topics_with_unusual_but_valid_characters(
    setup_factory: Callable[..., Setup], protocol: int
) -> None:
    s = setup_factory(protocol)
    infos = [s.publish(topic, str(i).encode()) for i, topic in enumerate(UNUSUAL_TOPICS)]
    s.wait_acked(infos)
    seen = s.wait_seen(len(UNUSUAL_TOPICS))
    # a non-shared route handles in publish order, and every topic arrives exactly as sent
    assert [r.topic for r in seen] == UNUSUAL_TOPICS
    for r in seen:
        assert r.params == {"kind": r.topic.split("/")[1]}, r
    assert s.dlq.collect(1, timeout=0.5) == []
    s.assert_unharmed()


# ------------------------------------------------------------------------------ properties


def _props(**values: Any) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def test_untrusted_mqtt5_properties(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory(5)
    replies = Subscriber(*s.broker.address, "replies/#")
    correlation = os.urandom(65_535)
    reply_topic = "replies/ünï code/$x/(1)"
    cases: dict[str, tuple[bytes, Properties]] = {
        "h/many-user-properties/p": (
            b"many",
            _props(UserProperty=[(f"k{i}", f"v{i}") for i in range(10_000)]),
        ),
        "h/huge-user-properties/p": (
            b"huge",
            _props(UserProperty=[(f"big{i}", "x" * 65_535) for i in range(100)]),
        ),
        "h/odd-user-properties/p": (
            b"odd",
            _props(UserProperty=[("dup", "1"), ("dup", "2"), ("", ""), ("ключ", "値\u202e")]),
        ),
        "h/content-type/p": (
            b"ct",
            _props(ContentType='application/x-ü; charset="utf-8"; ' + "p" * 60_000),
        ),
        "h/request/p": (
            b"request",
            _props(ResponseTopic=reply_topic, CorrelationData=correlation),
        ),
        # '$' topics are the broker's: the handler's reply is refused and the request dead-lettered
        "h/request-sys/p": (
            b"request-sys",
            _props(ResponseTopic="$SYS/hijack", CorrelationData=b"\x00" * 16),
        ),
        # claims UTF-8 and is not: the handler fails it and it is dead-lettered
        "h/lying-format/p": (
            b"\xff\xfe not utf-8",
            _props(PayloadFormatIndicator=1, ContentType="text/plain; charset=utf-8"),
        ),
        "h/expiring/p": (b"expiring", _props(MessageExpiryInterval=3600)),
    }
    try:
        infos = [s.publish(topic, payload, properties=p) for topic, (payload, p) in cases.items()]
        s.wait_acked(infos)
        seen = {r.topic: r for r in s.wait_seen(len(cases))}
        assert set(seen) == set(cases)
        assert seen["h/many-user-properties/p"].user_properties == 10_000
        assert seen["h/huge-user-properties/p"].user_properties == 100
        names = sum(len(f"big{i}") for i in range(100))
        assert seen["h/huge-user-properties/p"].user_property_bytes == 100 * 65_535 + names
        assert seen["h/odd-user-properties/p"].user_properties == 4
        assert seen["h/content-type/p"].content_type is not None
        assert seen["h/content-type/p"].content_type.endswith("p" * 60_000)
        assert seen["h/request/p"].response_topic == reply_topic
        assert seen["h/request/p"].correlation_sha == recorder.digest(correlation)

        (reply,) = replies.collect(1, timeout=20)
        assert reply.topic == reply_topic
        assert reply.properties.CorrelationData == correlation
        assert json.loads(reply.payload) == {"sha": recorder.digest(b"request")}
        assert replies.collect(1, timeout=0.5) == []

        letters = dead_letters(s, 2)
        assert set(letters) == {"h/lying-format/p", "h/request-sys/p"}
        assert "refusing to reply on '$SYS/hijack'" in letters["h/request-sys/p"][1]["error"]
        after = s.publish("h/after/p", b"after")
        s.wait_acked([after])
        assert s.wait_seen(len(cases) + 1)[-1].topic == "h/after/p"
        slot = s.daemon.wait_for(
            lambda st: st["slots"][0]["handled"] == len(cases) - 1, timeout=10, what="counters"
        )["slots"][0]
        assert slot["failed"] == 2
        s.assert_unharmed()
    finally:
        replies.close()


# ----------------------------------------------------------------------------- memory


class PeakRSS:
    """Samples a process's RSS every 10 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.01)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return int(self.process.memory_info().rss)


def wait_quiet(s: Setup, want: int, timeout: float, quiet: float = 1.5) -> list[recorder.Seen]:
    """Records until ``want`` arrived, or nothing new came for ``quiet`` s, or ``timeout``."""
    deadline = time.monotonic() + timeout
    seen = recorder.read(s.record)
    last_change = time.monotonic()
    while len(seen) < want and time.monotonic() < deadline:
        time.sleep(0.1)
        now = recorder.read(s.record)
        if len(now) != len(seen):
            seen, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            break
    return seen


def test_burst_of_megabyte_messages_keeps_worker_memory_bounded(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory(5)
    rss = PeakRSS(s.worker_pid)
    count = 64
    try:
        payloads = [bytes([65 + i % 26]) * MiB for i in range(count)]
        infos = [s.publish(f"h/burst/{i}", p, qos=1) for i, p in enumerate(payloads)]
        infos += [s.publish(f"h/burst0/{i}", p, qos=0) for i, p in enumerate(payloads)]
        s.wait_acked(infos[:count])
        s.wait_seen(count, timeout=90)
        seen = wait_quiet(s, 2 * count, timeout=30)  # QoS 0 is at most once: do not insist
    finally:
        after = rss.stop()
    qos1 = {r.topic for r in seen if r.topic.startswith("h/burst/")}
    qos0 = {r.topic for r in seen if r.topic.startswith("h/burst0/")}
    print(
        f"\nburst of 1 MiB messages: worker rss baseline {rss.baseline / MiB:.1f} MiB, "
        f"peak {rss.peak / MiB:.1f} MiB, after {after / MiB:.1f} MiB; "
        f"handled qos1 {len(qos1)}/{count}, qos0 {len(qos0)}/{count}"
    )
    assert qos1 == {f"h/burst/{i}" for i in range(count)}
    assert after < RSS_LIMIT
    assert rss.peak < RSS_LIMIT
    s.assert_unharmed()


def test_qos0_flood_faster_than_the_handler_keeps_worker_memory_bounded(
    setup_factory: Callable[..., Setup],
) -> None:
    """QoS 0 has no flow control: a publisher can push far more than a slow handler takes."""
    s = setup_factory(5, env={recorder.DELAY_ENV: "0.02"})
    rss = PeakRSS(s.worker_pid)
    count = 400
    try:
        for i in range(count):
            s.publish(f"h/flood/{i}", bytes([65 + i % 26]) * MiB, qos=0)
        marker = s.publish("h/flood-done/p", b"done", qos=1)
        s.wait_acked([marker], timeout=90)
        seen = wait_quiet(s, count + 1, timeout=60, quiet=3.0)
    finally:
        after = rss.stop()
    handled = sum(1 for r in seen if r.topic.startswith("h/flood/"))
    print(
        f"\nqos0 flood of {count} x 1 MiB, 20 ms handler: worker rss baseline "
        f"{rss.baseline / MiB:.1f} MiB, peak {rss.peak / MiB:.1f} MiB, after {after / MiB:.1f} "
        f"MiB; handled {handled}, dropped {count - handled}"
    )
    assert "h/flood-done/p" in {r.topic for r in seen}
    assert rss.peak < RSS_LIMIT
    assert after < RSS_LIMIT
    s.assert_unharmed()
