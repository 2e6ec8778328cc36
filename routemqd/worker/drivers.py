"""Who drives the socket: a thread with a select() loop, or an asyncio event loop.

Either way one thread reads the socket, parses packets, runs inline handlers (sync, concurrency 1)
or starts coroutines (async), writes PUBACKs, and reconnects with jittered backoff. Other threads
(pool runners, the main thread) only ``wake()`` it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import threading
from collections.abc import Callable

from routemqd.worker.link import Link

MISC_EVERY = 1.0  # keepalive bookkeeping at least this often (the smallest keepalive is 5 s)


class Backoff:
    """paho's exponential reconnect delay plus jitter, so a host's workers do not all reconnect
    in the same millisecond after a broker restart."""

    def __init__(self, low: float, high: float, rng: random.Random | None = None) -> None:
        self.low, self.high = low, high
        self.attempts = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        base = min(self.high, self.low * (2**self.attempts))
        self.attempts = min(self.attempts + 1, 16)
        return base + self.rng.uniform(0, base / 2)

    def reset(self) -> None:
        self.attempts = 0


class SelectDriver:
    """The socket thread for sync handlers. ``after_pass`` runs after each pass (with the link's
    lock held): the acknowledger settles what pool runners finished, runners take their batch."""

    def __init__(self, link: Link, after_pass: Callable[[], None], backoff: Backoff) -> None:
        self.link = link
        self.after_pass = after_pass
        self.backoff = backoff
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        link.wake = self.wake
        self.thread = threading.Thread(target=self._run, name="mqtt", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        link = self.link
        link.owner = threading.get_ident()
        wake_r = self._wake_r
        while True:
            sock = link.socket()
            if sock is None:
                if link.closing:
                    return
                self._reconnect()
                continue
            wlist = [sock] if link.want_write() else []
            try:
                readable, _, _ = select.select([sock, wake_r], wlist, [], MISC_EVERY)
            except (OSError, ValueError):
                readable = [sock]  # closed under us: the read reports it
            if wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
            link.service(sock in readable)
            with link.lock:
                self.after_pass()

    def _reconnect(self) -> None:
        delay = self.backoff.next_delay()
        select.select([self._wake_r], [], [], delay)
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        if self.link.closing:
            return
        with contextlib.suppress(OSError):
            self.link.reconnect()

    def join(self, timeout: float) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)


class AsyncioDriver:
    """The event loop reads and writes the socket itself, through paho's socket callbacks (the
    approach of aiomqtt): async handlers run on the same thread and pay no hand-off."""

    def __init__(
        self,
        link: Link,
        loop: asyncio.AbstractEventLoop,
        backoff: Backoff,
        after_pass: Callable[[], None],
    ) -> None:
        self.link = link
        self.loop = loop
        self.after_pass = after_pass
        self.backoff = backoff
        self._fd: int | None = None
        self._writing = False
        self._misc: asyncio.TimerHandle | None = None
        self.closed = loop.create_future()
        link.wake = self.wake
        client = link.client
        client.on_socket_open = lambda _c, _u, sock: self._open(sock)
        client.on_socket_close = lambda _c, _u, _sock: self._close()
        client.on_socket_register_write = lambda _c, _u, _s: self.wake()
        client.on_socket_unregister_write = lambda _c, _u, _s: None

    def start(self) -> None:
        self.link.owner = threading.get_ident()
        sock = self.link.socket()
        if sock is not None:
            self._open(sock)
        else:
            self._schedule_reconnect()
        self._misc = self.loop.call_later(MISC_EVERY, self._tick)

    def wake(self) -> None:
        """Ask for a write pass; from any thread."""
        if self.link.on_socket_thread():
            self._arm_writer()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to write
                self.loop.call_soon_threadsafe(self._arm_writer)

    def _open(self, sock: object) -> None:
        fd = sock.fileno()  # type: ignore[attr-defined]
        self._fd = fd
        self.loop.add_reader(fd, self._readable)
        self._arm_writer()

    def _close(self) -> None:
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            if self._writing:
                self.loop.remove_writer(self._fd)
            self._fd, self._writing = None, False
        if self.link.closing:
            if not self.closed.done():
                self.closed.set_result(None)
        else:
            self.loop.call_soon(self._schedule_reconnect)

    def _arm_writer(self) -> None:
        if self._fd is not None and not self._writing and self.link.want_write():
            self._writing = True
            self.loop.add_writer(self._fd, self._writable)
        elif self._fd is None and self.link.closing and not self.closed.done():
            self.closed.set_result(None)

    def _readable(self) -> None:
        self.link.service(True)
        with self.link.lock:
            self.after_pass()
        self._arm_writer()

    def _writable(self) -> None:
        self.link.write()
        if not self.link.want_write() and self._fd is not None and self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False

    def _tick(self) -> None:
        self.link.misc()
        self._misc = self.loop.call_later(MISC_EVERY, self._tick)

    def _schedule_reconnect(self) -> None:
        if self.link.closing:
            if not self.closed.done():
                self.closed.set_result(None)
            return
        self.loop.call_later(self.backoff.next_delay(), self._reconnect)

    def _reconnect(self) -> None:
        if self.link.closing or self.link.socket() is not None:
            return
        try:
            self.link.reconnect()  # on success paho calls on_socket_open
        except OSError:
            self._schedule_reconnect()

    def stop(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
