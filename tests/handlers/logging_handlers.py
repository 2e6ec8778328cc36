"""Handlers and a setup hook that log through structlog, as users' handlers do, then record the
message in the ledger: a message in the ledger means its log event was written before."""

from __future__ import annotations

import structlog

from routemqd.context import WorkerContext
from routemqd.message import Message
from tests.handlers.ledger import record

log = structlog.get_logger("handler")


def setup(ctx: WorkerContext) -> None:
    log.info("user_setup")


def handle(message: Message) -> None:
    log.info("user_handled", topic=message.topic)
    record(message)


async def handle_async(message: Message) -> None:
    log.info("user_handled", topic=message.topic)
    record(message)
