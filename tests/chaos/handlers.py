"""Handlers for the chaos soak: record every message with the time it was handled.

Ledger line: ``<id> <pid> <dup> <handled_at_ns> <tag>``. A payload ``<id>:raise`` raises (the
message is dead-lettered); ``<id>:sleep=S`` sleeps first so kills often land mid-message.
"""

from __future__ import annotations

import os
import time

from routemqd.message import Message

_fd: int | None = None


def _write(line: str) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["ROUTEMQD_CHAOS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(_fd, line.encode())


def _work(message: Message, tag: str) -> None:
    ident, _, cmd = message.payload.decode().partition(":")
    if cmd == "raise":
        raise ValueError(f"chaos: message {ident} refuses to be handled")
    if cmd.startswith("sleep="):
        time.sleep(float(cmd[6:]))
    _write(f"{ident} {os.getpid()} {int(message.dup)} {time.time_ns()} {tag}\n")


def work(message: Message) -> None:
    _work(message, "v1")


def work_v2(message: Message) -> None:
    _work(message, "v2")
