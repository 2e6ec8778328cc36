"""Ledger handlers that also record when each message was handled.

Every message gets the usual ledger line (``<id> <pid> <dup> <topic> <tag>``, so the helpers in
``tests/support/ledger.py`` work unchanged) and, when ``ROUTEMQD_TEST_TIMES`` is set, a line
``<id> <pid> <topic> <unix time>`` in that file. Both are single O_APPEND writes, so several
workers can share the files. The payload commands of ``tests/handlers/ledger.py`` apply.
"""

from __future__ import annotations

import os
import threading
import time

from routemqd.message import Message
from tests.handlers.ledger import _act, _ledger_fd

_times_fd: int | None = None
_lock = threading.Lock()


def _times() -> int | None:
    global _times_fd
    path = os.environ.get("ROUTEMQD_TEST_TIMES")
    if not path:
        return None
    if _times_fd is None:
        with _lock:
            if _times_fd is None:
                _times_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return _times_fd


def _write(message: Message, tag: str) -> None:
    ident = _act(message)
    pid = os.getpid()
    os.write(_ledger_fd(), f"{ident} {pid} {int(message.dup)} {message.topic} {tag}\n".encode())
    fd = _times()
    if fd is not None:
        os.write(fd, f"{ident} {pid} {message.topic} {time.time():.6f}\n".encode())


def record(message: Message) -> None:
    _write(message, "v1")


def record_v2(message: Message) -> None:
    _write(message, "v2")


def record_v3(message: Message) -> None:
    _write(message, "v3")
