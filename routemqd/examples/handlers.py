"""Handlers used by ``etc/routemq.yaml``. Copy one as a starting point for your own.

A handler is ``def handle(message)`` or ``async def handle(message)``. Return normally and the
message is acknowledged; raise and it is logged (and dead-lettered if the route says so), then
acknowledged, so one bad message never blocks the pool.
"""

from __future__ import annotations

import asyncio

import structlog

from routemqd.message import Message

log = structlog.get_logger("handler")


def log_reading(message: Message) -> None:
    """Decode a JSON sensor reading and log it with the device id taken from the topic."""
    reading = message.json()
    log.info(
        "reading",
        device=message.params.get("device_id"),
        value=reading.get("value"),
        topic=message.topic,
    )


def log_event(message: Message) -> None:
    """Log any payload, binary or text, without assuming its format."""
    try:
        text = message.text()[:200]
    except ValueError:
        text = f"<{len(message.payload)} binary bytes>"
    log.info("event", topic=message.topic, params=dict(message.params), payload=text)


async def echo(message: Message) -> None:
    """An async handler: answer MQTT 5 requests on their response topic, else echo to replies/."""
    await asyncio.sleep(0)
    if not message.reply(message.payload):
        message.publish(f"replies/{message.topic}", message.payload, qos=1)


def noop(message: Message) -> None:
    """Does nothing: used by benchmarks to measure routemqd's own cost per message."""
