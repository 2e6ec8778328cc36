"""What a handler receives: one MQTT message, its route params, and a way to publish.

Payloads stay ``bytes``: decoding is the handler's decision (``text()``, ``json()``), so a binary
or malformed payload never crashes the worker before the handler even sees it. Properties are
converted from paho's object only when asked for, to keep the per-message cost off the hot path.
"""

from __future__ import annotations

import json as _json
from collections.abc import Callable, Mapping
from typing import Any

from routemqd import context as _context
from routemqd.topics import TopicPattern


class PayloadError(ValueError):
    """The payload is not what ``json()`` / ``text()`` was asked to decode; says where and why."""


PublishFn = Callable[[str, bytes | str, int, bool, Mapping[str, Any] | None], Any]

_PROPERTY_NAMES = {
    "PayloadFormatIndicator": "payload_format_indicator",
    "MessageExpiryInterval": "message_expiry_interval",
    "ContentType": "content_type",
    "ResponseTopic": "response_topic",
    "CorrelationData": "correlation_data",
    "SubscriptionIdentifier": "subscription_identifier",
    "TopicAlias": "topic_alias",
}


class Message:
    """One received message. Read-only by convention; created by the worker per delivery."""

    __slots__ = (
        "_params",
        "_pattern",
        "_props",
        "_props_raw",
        "_publish",
        "attempt",
        "dup",
        "mid",
        "payload",
        "pending",
        "qos",
        "retain",
        "route",
        "topic",
    )

    def __init__(
        self,
        *,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        mid: int = 0,
        params: Mapping[str, str] | None = None,
        properties: Any = None,
        route: str = "",
        attempt: int = 1,
        publish: PublishFn | None = None,
        pattern: TopicPattern | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.mid = mid
        # params are taken from the topic only when a handler asks: most cost nothing then
        self._params: Mapping[str, str] | None = params
        self._pattern = pattern
        self.pending: list[Any] = []  # what publish() sent; acked before this message is
        self.route = route
        self.attempt = attempt
        self._props_raw = properties
        self._props: dict[str, Any] | None = None
        self._publish = publish

    @property
    def params(self) -> Mapping[str, str]:
        """Values of the route pattern's ``{name}`` levels, e.g. ``{"device_id": "dev1"}``."""
        if self._params is None:
            matched = self._pattern.match(self.topic) if self._pattern is not None else None
            self._params = matched or {}
        return self._params

    def text(self, encoding: str = "utf-8") -> str:
        try:
            return self.payload.decode(encoding)
        except UnicodeDecodeError as e:
            raise PayloadError(
                f"payload on {self.topic!r} is not valid {encoding} at byte {e.start}"
            ) from None

    def json(self) -> Any:
        """Decode the payload as JSON; a clear PayloadError (not a bare ValueError) if not."""
        if not self.payload:
            raise PayloadError(f"payload on {self.topic!r} is empty, expected JSON")
        try:
            return _json.loads(self.payload)
        except UnicodeDecodeError as e:
            raise PayloadError(
                f"payload on {self.topic!r} is not UTF-8 text at byte {e.start}, expected JSON"
            ) from None
        except _json.JSONDecodeError as e:
            raise PayloadError(
                f"payload on {self.topic!r} is not valid JSON: {e.msg} at byte {e.pos}"
            ) from None

    @property
    def properties(self) -> Mapping[str, Any]:
        """MQTT 5 properties as a plain dict with snake_case names (empty for MQTT 3.1.1).

        ``user_properties`` is a list of (name, value) pairs, since MQTT allows repeated names.
        """
        if self._props is None:
            self._props = _convert_properties(self._props_raw)
        return self._props

    @property
    def context(self) -> _context.WorkerContext:
        """The worker's context: its route and slot, and the ``state`` its ``setup`` filled.

        A class-level property over the process's one context, so deliveries carry nothing."""
        return _context.current()

    @property
    def user_properties(self) -> list[tuple[str, str]]:
        return list(self.properties.get("user_properties", ()))

    def publish(
        self,
        topic: str,
        payload: bytes | str | Any,
        qos: int = 1,
        retain: bool = False,
        properties: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish from a handler. The incoming message is acknowledged only after every message
        published here is acknowledged by the broker, so a crash never loses the reply."""
        if self._publish is None:
            raise RuntimeError("this message was not delivered by a worker; it cannot publish")
        if not isinstance(payload, bytes | bytearray | str):
            payload = _json.dumps(payload, separators=(",", ":"))
        self.pending.append(self._publish(topic, payload, qos, retain, properties))

    def reply(self, payload: bytes | str | Any, qos: int = 1) -> bool:
        """Answer an MQTT 5 request (response topic + correlation data); False if none asked.

        ValueError if the response topic starts with '$' (reserved for the broker)."""
        props = self.properties
        response_topic = props.get("response_topic")
        if not response_topic:
            return False
        if response_topic.startswith("$"):
            # The publisher chose it: '$' topics belong to the broker ($SYS, and mosquitto drops
            # the connection of a client that publishes there), never to an application.
            raise ValueError(
                f"refusing to reply on {response_topic!r}: topics starting with '$' are reserved"
            )
        out: dict[str, Any] = {}
        if "correlation_data" in props:
            out["correlation_data"] = props["correlation_data"]
        self.publish(response_topic, payload, qos=qos, properties=out)
        return True

    def __repr__(self) -> str:
        return (
            f"Message(topic={self.topic!r}, params={dict(self.params)!r}, qos={self.qos}, "
            f"payload={len(self.payload)} bytes)"
        )


def _convert_properties(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    out: dict[str, Any] = {}
    for attr, name in _PROPERTY_NAMES.items():
        if hasattr(raw, attr):
            out[name] = getattr(raw, attr)
    if hasattr(raw, "UserProperty"):
        out["user_properties"] = [(str(k), str(v)) for k, v in raw.UserProperty]
    return out
