"""Tests for routemqd.message: payload decoding, MQTT 5 properties, publish and reply."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from routemqd.message import Message, PayloadError

TOPIC = "sensors/dev-1/data"


@dataclass
class Recorder:
    calls: list[tuple[str, bytes | str, int, bool, Mapping[str, Any] | None]] = field(
        default_factory=list
    )

    def __call__(
        self,
        topic: str,
        payload: bytes | str,
        qos: int,
        retain: bool,
        properties: Mapping[str, Any] | None,
    ) -> None:
        self.calls.append((topic, payload, qos, retain, properties))


def msg(payload: bytes = b"", **kwargs: Any) -> Message:
    return Message(topic=TOPIC, payload=payload, **kwargs)


def request_properties(
    response_topic: str | None = "replies/dev-1", correlation: bytes | None = b"\x00req-42"
) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("trace", "abc"), ("trace", "def")]
    props.UserProperty = ("tenant", "t1")
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    props.ContentType = "application/json"
    props.MessageExpiryInterval = 30
    return props


# ----------------------------------------------------------------------------------- payloads


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b'{"value": 21.5}', {"value": 21.5}),
        (b"[1, 2, 3]", [1, 2, 3]),
        (b"42", 42),
        (b'"text"', "text"),
        (b"null", None),
        ('{"name": "Zürich"}'.encode(), {"name": "Zürich"}),
    ],
)
def test_json_ok(payload: bytes, value: Any) -> None:
    assert msg(payload).json() == value


@pytest.mark.parametrize(
    ("payload", "phrase"),
    [
        (b"", "is empty, expected JSON"),
        (b"{not json", "is not valid JSON"),
        (b'{"a": 1} trailing', "is not valid JSON"),
        (b"\xff{}", "is not UTF-8 text at byte 0"),
        (b"\xff\xfe\x00garbage", "is not valid JSON"),
        (b'{"a": "\xc3\x28"}', "is not UTF-8 text at byte 7"),
    ],
    ids=[
        "empty",
        "invalid",
        "trailing",
        "invalid-utf8-start",
        "bom-garbage",
        "invalid-utf8-inside",
    ],
)
def test_json_errors_are_payload_errors_naming_the_topic(payload: bytes, phrase: str) -> None:
    with pytest.raises(PayloadError) as info:
        msg(payload).json()
    assert repr(TOPIC) in str(info.value)
    assert phrase in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None


def test_text() -> None:
    assert msg("grüße".encode()).text() == "grüße"
    assert msg(b"").text() == ""
    assert msg("caf\xe9".encode("latin-1")).text("latin-1") == "caf\xe9"


def test_text_invalid_utf8_is_a_payload_error() -> None:
    with pytest.raises(PayloadError) as info:
        msg(b"ok\xff").text()
    assert repr(TOPIC) in str(info.value)
    assert "not valid utf-8 at byte 2" in str(info.value)


def test_defaults_and_repr() -> None:
    m = msg(b"abc", params={"id": "dev-1"}, qos=1)
    assert m.params == {"id": "dev-1"}
    assert m.retain is False and m.dup is False and m.attempt == 1
    assert repr(m) == (
        "Message(topic='sensors/dev-1/data', params={'id': 'dev-1'}, qos=1, payload=3 bytes)"
    )
    assert msg().params == {}


# --------------------------------------------------------------------------------- properties


def test_properties_from_paho() -> None:
    m = msg(b"{}", properties=request_properties())
    props = m.properties
    assert props["response_topic"] == "replies/dev-1"
    assert props["correlation_data"] == b"\x00req-42"
    assert props["content_type"] == "application/json"
    assert props["message_expiry_interval"] == 30
    assert props["user_properties"] == [("trace", "abc"), ("trace", "def"), ("tenant", "t1")]
    assert m.user_properties == [("trace", "abc"), ("trace", "def"), ("tenant", "t1")]
    assert "topic_alias" not in props
    assert m.properties is props


def test_properties_empty_without_mqtt5() -> None:
    m = msg(b"x")
    assert m.properties == {}
    assert m.user_properties == []


def test_properties_without_user_properties() -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "r"
    m = msg(b"x", properties=props)
    assert m.properties == {"response_topic": "r"}
    assert m.user_properties == []


# ---------------------------------------------------------------------------- publish / reply


def test_reply_without_response_topic_returns_false() -> None:
    rec = Recorder()
    assert msg(b"x", publish=rec).reply(b"answer") is False
    props = request_properties(response_topic=None)
    assert msg(b"x", properties=props, publish=rec).reply(b"answer") is False
    assert rec.calls == []


def test_reply_publishes_to_response_topic_with_correlation_data() -> None:
    rec = Recorder()
    m = msg(b"x", properties=request_properties(), publish=rec)
    assert m.reply(b"answer") is True
    assert rec.calls == [
        ("replies/dev-1", b"answer", 1, False, {"correlation_data": b"\x00req-42"})
    ]


def test_reply_without_correlation_data() -> None:
    rec = Recorder()
    m = msg(b"x", properties=request_properties(correlation=None), publish=rec)
    assert m.reply({"ok": True}, qos=0) is True
    assert rec.calls == [("replies/dev-1", '{"ok":true}', 0, False, {})]


def test_publish_without_worker_raises() -> None:
    m = msg(b"x")
    with pytest.raises(RuntimeError, match="not delivered by a worker"):
        m.publish("out/topic", b"data")


def test_reply_without_worker_raises_when_a_reply_is_asked() -> None:
    with pytest.raises(RuntimeError):
        msg(b"x", properties=request_properties()).reply(b"answer")


def test_publish_passes_arguments_through() -> None:
    rec = Recorder()
    m = msg(b"x", publish=rec)
    m.publish("out/a", b"\x00bin", qos=2, retain=True, properties={"content_type": "x"})
    m.publish("out/b", "text")
    m.publish("out/c", bytearray(b"ba"))
    assert rec.calls == [
        ("out/a", b"\x00bin", 2, True, {"content_type": "x"}),
        ("out/b", "text", 1, False, None),
        ("out/c", bytearray(b"ba"), 1, False, None),
    ]


@pytest.mark.parametrize("payload", [{"value": 1, "unit": "°C"}, [1, "a", None], 42, None, True])
def test_non_bytes_payload_is_published_as_json(payload: Any) -> None:
    rec = Recorder()
    msg(b"x", publish=rec).publish("out", payload)
    (call,) = rec.calls
    sent = call[1]
    assert isinstance(sent, str)
    assert json.loads(sent) == payload
    assert ", " not in sent and ": " not in sent


def test_unserialisable_payload_raises_type_error() -> None:
    rec = Recorder()
    with pytest.raises(TypeError):
        msg(b"x", publish=rec).publish("out", {"when": object()})
    assert rec.calls == []
