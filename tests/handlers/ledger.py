"""Test handlers that write every handled message to a ledger file, one line per message.

The payload drives the behaviour so one handler serves many tests: ``<id>`` is recorded;
``<id>:sleep=S`` sleeps first; ``<id>:burn=S`` spends S seconds of CPU first; ``<id>:raise``
raises; ``<id>:exit`` kills the worker (``os._exit``); ``<id>:block`` never returns. Lines are
written with O_APPEND in one write, so several worker processes can share one ledger file safely.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from routemqd.message import Message

_fds: dict[str, int] = {}
_lock = threading.Lock()


def append_fd(env: str) -> int:
    """The O_APPEND descriptor of the file named by environment variable ``env``, opened once
    per process (one write per line keeps lines whole across processes)."""
    fd = _fds.get(env)
    if fd is None:
        with _lock:
            fd = _fds.get(env)
            if fd is None:
                fd = _fds[env] = os.open(os.environ[env], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return fd


def _ledger_fd() -> int:
    return append_fd("ROUTEMQD_TEST_LEDGER")


def _act(message: Message) -> str:
    body = message.payload.decode("utf-8", "replace")
    ident, _, cmd = body.partition(":")
    if cmd.startswith("sleep="):
        time.sleep(float(cmd.split("=", 1)[1]))
    elif cmd.startswith("burn="):
        end = time.thread_time() + float(cmd.split("=", 1)[1])
        while time.thread_time() < end:
            pass
    elif cmd == "raise":
        raise ValueError(f"refusing message {ident}")
    elif cmd == "exit":
        os._exit(9)
    elif cmd == "block":
        threading.Event().wait()
    return ident


def record(message: Message) -> None:
    ident = _act(message)
    tag = os.environ.get("ROUTEMQD_TEST_TAG", "v1")
    line = f"{ident} {os.getpid()} {int(message.dup)} {message.topic} {tag}\n"
    os.write(_ledger_fd(), line.encode())


async def record_async(message: Message) -> None:
    record(message)


def record_v2(message: Message) -> None:
    """Same as record, tagged v2: tests of handler replacement tell old from new."""
    ident = _act(message)
    line = f"{ident} {os.getpid()} {int(message.dup)} {message.topic} v2\n"
    os.write(_ledger_fd(), line.encode())


def raise_every_10th(message: Message) -> None:
    ident = message.payload.decode()
    if int(ident) % 10 == 0:
        raise ValueError(f"message {ident} is a multiple of 10")
    record(message)


def allocate(message: Message) -> None:
    """Grow memory by the number of MiB in the payload, then record."""
    global _hoard
    mib = int(message.payload.decode().partition(":")[2] or 0)
    _hoard.append(bytearray(mib * 1024 * 1024))
    record(message)


_hoard: list[bytearray] = []


def crash_on_import_marker(message: Message) -> None:
    record(message)


def record_json(message: Message) -> None:
    """Decode the payload with ``message.json()`` and record the ``id`` it carries."""
    doc = message.json()
    ident = str(doc["id"])
    tag = os.environ.get("ROUTEMQD_TEST_TAG", "v1")
    line = f"{ident} {os.getpid()} {int(message.dup)} {message.topic} {tag}\n"
    os.write(_ledger_fd(), line.encode())


_running = 0
_peak = 0


async def record_async_overlap(message: Message) -> None:
    """Yield to the event loop for 10 ms, then record; the tag is ``peak<N>``, the most
    handler calls this process had running at once so far."""
    global _running, _peak
    _running += 1
    _peak = max(_peak, _running)
    try:
        await asyncio.sleep(0.01)
        ident = _act(message)
        line = f"{ident} {os.getpid()} {int(message.dup)} {message.topic} peak{_peak}\n"
        os.write(_ledger_fd(), line.encode())
    finally:
        _running -= 1


def sleep_then_raise(message: Message) -> None:
    """``<id>:sleep=S`` sleeps, then raises (a failure that may end while the broker is away);
    any other payload is recorded."""
    if ":sleep=" in message.payload.decode("utf-8", "replace"):
        ident = _act(message)
        raise ValueError(f"message {ident} failed after sleeping")
    record(message)
