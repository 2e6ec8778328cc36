"""The master <-> worker wire: JSON lines over two pipes, one each way.

Pipes, not sockets or shared files, because a pipe's EOF is how each side learns the other died,
for free, without polling. Lines stay well under PIPE_BUF (4 KiB) apart from rare stack reports,
so a line is written atomically and never interleaves. Worker -> master events: ``warm`` (handler
imported), ``ready`` (CONNACK and SUBACK received), ``hb`` (heartbeat with counters), ``stuck``
(a handler passed its deadline; carries its stack), ``boot_error`` (why the worker is about to
exit with a boot-failure code). Master -> worker commands: ``connect`` (a held worker may now take
over the slot's session) and ``stop`` with ``mode`` ``keep`` or ``retire``.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from enum import StrEnum
from typing import Any


class Event(StrEnum):
    """Worker -> master, the ``t`` field. The values are the wire strings."""

    WARM = "warm"
    READY = "ready"
    HEARTBEAT = "hb"
    STUCK = "stuck"
    BOOT_ERROR = "boot_error"
    SESSION_ENDED = "session_ended"  # a retiring worker left the group and ended its session


class Command(StrEnum):
    """Master -> worker, the ``cmd`` field."""

    CONNECT = "connect"
    STOP = "stop"
    REOPEN_LOGS = "reopen_logs"


class StopMode(StrEnum):
    KEEP = "keep"  # finish, ack, disconnect keeping the session (a restart, a replace)
    RETIRE = "retire"  # unsubscribe, drain, end the session (the slot is gone for good)


STOP_KEEP = StopMode.KEEP
STOP_RETIRE = StopMode.RETIRE

# Upper bounds (seconds) of the handler-duration histogram a heartbeat carries, +Inf implied.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), default=str).encode() + b"\n"


def write_event(fd: int, event: dict[str, Any]) -> bool:
    """Write one line; False when the reader is gone (the other side died)."""
    data = encode(event)
    try:
        while data:
            n = os.write(fd, data)
            data = data[n:]
        return True
    except BlockingIOError:
        return True  # the reader is slow; a heartbeat can be skipped, the next one follows
    except OSError as e:
        if e.errno in (errno.EPIPE, errno.EBADF):
            return False
        raise


class LineReader:
    """Split a non-blocking pipe's bytes into decoded JSON events; tolerates partial lines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""
        self.eof = False

    def read(self) -> Iterator[dict[str, Any]]:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return
        self._buf += chunk
        if len(self._buf) > 4 * 1024 * 1024:  # a runaway writer must not grow the master
            self._buf = b""
            return
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event
