"""Handlers the benchmark's routemqd workers run (imported through the manifest's python_path).

Payloads come from ``bench/publisher.py``: ``<id> [<sent_ns>] xxx...``. Handlers that record write
one line per message with a single unbuffered ``os.write`` (workers leave with ``os._exit``, so
nothing may sit in a buffer) to a file of their own in ``$ROUTEMQD_BENCH_DIR``:

- ``latency``: ``<id> <sent_ns> <handler_start_ns>`` to ``lat-<pid>.txt``;
- ``ledger`` / ``ledger_v2``: ``<id> <pid> <unix time> <tag>`` to ``ledger-<pid>.txt``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from routemqd.message import Message

_fds: dict[str, int] = {}


def _fd(prefix: str) -> int:
    fd = _fds.get(prefix)
    if fd is None:
        path = os.path.join(os.environ["ROUTEMQD_BENCH_DIR"], f"{prefix}-{os.getpid()}.txt")
        fd = _fds[prefix] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return fd


def noop(message: Message) -> None:
    """Nothing at all: what is measured is routemqd's own cost per message."""


_stamp = [0, 0.0]  # messages handled by this worker, unix time of the last one


def stamp(message: Message) -> None:
    """What the baseline consumer's ``on_message`` does (count, time of the last message), so
    the throughput cases time both systems the same way, to the message, not by heartbeats."""
    _stamp[0] += 1
    _stamp[1] = time.time()


_stamp_lock = threading.Lock()


def _stamp_shared(message: Message) -> None:
    """``stamp`` for handlers that run on several threads (concurrency > 1)."""
    with _stamp_lock:
        stamp(message)


def write_stamp(ctx: object) -> None:
    """Teardown hook: leave ``<count> <last>`` in ``stamp-<pid>.txt`` for the benchmark."""
    if _stamp[0]:
        os.write(_fd("stamp"), b"%d %.6f\n" % (_stamp[0], _stamp[1]))


def latency(message: Message) -> None:
    now = time.time_ns()
    ident, sent = message.payload.split(b" ", 2)[:2]
    os.write(_fd("lat"), b"%s %s %d\n" % (ident, sent, now))


def _ledger(message: Message, tag: bytes) -> None:
    ident = message.payload.split(b" ", 1)[0]
    os.write(_fd("ledger"), b"%s %d %.6f %s\n" % (ident, os.getpid(), time.time(), tag))


def ledger(message: Message) -> None:
    _ledger(message, b"v1")


def ledger_v2(message: Message) -> None:
    _ledger(message, b"v2")


def burn_1ms(message: Message) -> None:
    """1 ms of CPU time of this thread (not wall time: waiting for the GIL does not count)."""
    end = time.thread_time() + 0.001
    while time.thread_time() < end:
        pass
    _stamp_shared(message)


def sleep_10ms(message: Message) -> None:
    time.sleep(0.01)
    _stamp_shared(message)


async def async_sleep_10ms(message: Message) -> None:
    await asyncio.sleep(0.01)
    stamp(message)  # one event loop thread


def ledger_sleep_2ms(message: Message) -> None:
    """An I/O-bound handler (2 ms of waiting, almost no CPU) that counts every id: the autoscale
    case's load, where one worker tops out near 450 msg/s."""
    time.sleep(0.002)
    _ledger(message, b"v1")
