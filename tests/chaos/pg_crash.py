"""Middleware for the PostgreSQL chaos run: die between the commit and the acknowledgement.

Outermost in the chain, so ``call_next`` returning means the example's handler has committed its
row; ``os._exit`` right then leaves the message unacknowledged, and the broker redelivers a
reading that is already in the table. Fires once per chosen id (a marker file made with
``O_EXCL`` in ``ROUTEMQ_CHAOS_CRASH_DIR``), for ids whose number is ``13 mod 997``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from routemqd.message import Message

CRASH_MODULUS = 997  # at 500 msg/s: one crash every 2 s on top of the kills
CRASH_RESIDUE = 13
EXIT_CODE = 137  # what a SIGKILL looks like: the master sees a crash, not a clean stop


def chosen(number: int) -> bool:
    return number % CRASH_MODULUS == CRASH_RESIDUE


def exit_after_commit(message: Message, call_next: Any) -> Any:
    result = call_next(message)
    reading_id = json.loads(message.payload)["id"]
    if chosen(int(reading_id.lstrip("r"))) and _first_time(reading_id):
        os._exit(EXIT_CODE)
    return result


def _first_time(reading_id: str) -> bool:
    path = os.path.join(os.environ["ROUTEMQ_CHAOS_CRASH_DIR"], reading_id)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
