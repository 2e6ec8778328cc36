"""A handler that gets stuck on a message's first delivery and records its redelivery.

``<id>:block`` blocks forever unless the broker marks the message as a redelivery (``dup``), so a
stuck worker is killed, the replacement gets the message again, and the ledger shows it handled.
Any other payload is handled as by :func:`tests.handlers.ledger.record`.
"""

from __future__ import annotations

import os
import threading

from routemqd.message import Message
from tests.handlers import ledger


def record(message: Message) -> None:
    body = message.payload.decode("utf-8", "replace")
    ident, _, cmd = body.partition(":")
    if cmd != "block":
        ledger.record(message)
        return
    if not message.dup:
        threading.Event().wait()
    tag = os.environ.get("ROUTEMQD_TEST_TAG", "v1")
    line = f"{ident} {os.getpid()} {int(message.dup)} {message.topic} {tag}\n"
    os.write(ledger._ledger_fd(), line.encode())
