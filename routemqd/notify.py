"""Minimal ``sd_notify(3)`` client that does not need libsystemd.

routemqd runs under systemd as ``Type=notify`` (or ``Type=notify-reload`` on
systemd >= 253): systemd only considers the service started once the master
sends ``READY=1``, tracks reloads through ``RELOADING=1``, and kills the master
if it stops sending ``WATCHDOG=1``. The protocol is one ``AF_UNIX``/``SOCK_DGRAM``
datagram of newline-separated ``KEY=value`` pairs sent to ``$NOTIFY_SOCKET``,
which is simple enough that pulling in libsystemd (or a binding) is not worth
a native dependency.

Two rules shape this module:

* Notifying is best effort. The daemon's job is routing MQTT messages; it must
  never die or stall because the notify socket vanished, systemd is busy, or
  the service runs outside systemd. Every send swallows ``OSError`` and uses a
  non-blocking socket, so a full receive queue drops the datagram instead of
  blocking the event loop.
* Only the master notifies. systemd attributes notifications to the sending
  PID, and with ``NotifyAccess=main`` it rejects (and logs) datagrams from
  workers; with looser settings a worker's ``READY=1``/``STOPPING=1`` would be
  believed. Forked workers therefore call :meth:`Notifier.forget` right after
  ``fork()``, and as a second line of defence a notifier refuses to send from
  any PID other than the one that created it.

Note for the supervisor: the caller that spawns workers is responsible for
removing ``NOTIFY_SOCKET`` (and the ``WATCHDOG_*`` variables, see
:data:`NOTIFY_ENV_VARS`) from the child's environment, so that a program the
worker executes, or a library calling libsystemd inside it, cannot notify as
the service either. This module never mutates ``os.environ`` itself.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Final, Self

__all__ = ["NOTIFY_ENV_VARS", "Notifier", "watchdog_interval"]

log = logging.getLogger(__name__)

#: Environment variables systemd sets for the main process only; a supervisor
#: strips these from its workers' environment.
NOTIFY_ENV_VARS: Final[tuple[str, ...]] = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

FieldValue = str | int | float | bool


def _parse_address(raw: str | None) -> bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a ``sendto`` address, or ``None`` if unusable.

    A leading ``@`` denotes a Linux abstract socket, whose kernel name starts
    with a NUL byte. Relative paths and other schemes (e.g. ``vsock:``) are not
    something systemd hands to a local service, so they disable notifying
    rather than guessing.
    """
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    log.debug("ignoring unsupported NOTIFY_SOCKET address %r", raw)
    return None


def _single_line(text: str) -> str:
    """Collapse ``text`` to one line: a newline would start a new ``KEY=value``."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _format_value(value: FieldValue) -> str:
    """Render a field value; booleans become ``1``/``0`` as systemd expects."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return _single_line(str(value))


class Notifier:
    """Sends state notifications to the service manager over ``$NOTIFY_SOCKET``.

    Build it with :meth:`from_env`. When the variable is unset (running in a
    terminal, in tests, under another supervisor) every method is a cheap
    no-op, so callers never need to check whether systemd is present.

    One non-blocking datagram socket is opened lazily and reused for every
    message; it is unconnected (``sendto``), so a notify socket that is
    recreated at the same address keeps working. All senders return ``True``
    if the datagram was handed to the kernel and ``False`` otherwise; they
    never raise.

    Workers forked by the master must call :meth:`forget` immediately after
    ``fork()`` so they cannot notify as the master.
    """

    __slots__ = ("_address", "_lock", "_owner_pid", "_sock")

    def __init__(self, address: bytes | None) -> None:
        """Create a notifier for a raw ``AF_UNIX`` address (``None`` = disabled).

        Prefer :meth:`from_env`; this constructor exists for tests and for
        callers that already resolved the address.
        """
        self._address: bytes | None = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Self:
        """Build a notifier from ``$NOTIFY_SOCKET`` in ``environ``.

        Path sockets (``/run/systemd/notify``) and abstract sockets
        (``@name``) are supported; anything else yields a disabled notifier.
        """
        return cls(_parse_address(environ.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        """Whether sends can reach a service manager at all."""
        return self._address is not None and os.getpid() == self._owner_pid

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<{type(self).__name__} {state} address={self._address!r}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- protocol messages -------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Report start-up (or a reload) as complete, optionally with a status line.

        Both fields travel in one datagram so the status shown by
        ``systemctl status`` never lags behind the state change.
        """
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def reloading(self) -> bool:
        """Report that a configuration reload has begun.

        ``Type=notify-reload`` requires ``MONOTONIC_USEC`` in the same
        datagram as ``RELOADING=1``: systemd uses the timestamp to tell this
        reload apart from one it triggered earlier. Send :meth:`ready` when the
        reload finishes.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> bool:
        """Report that shutdown has begun, so systemd shows ``deactivating``."""
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """Set the free-form status line; newlines are folded into spaces."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Ping the service watchdog; call every :func:`watchdog_interval` seconds."""
        return self.send(WATCHDOG=1)

    def send(self, **fields: FieldValue) -> bool:
        """Send ``KEY=value`` pairs in one datagram, in argument order.

        Values are rendered on a single line because the protocol is
        newline-delimited; ``True``/``False`` become ``1``/``0``.
        """
        if not fields:
            return False
        payload = "\n".join(f"{key}={_format_value(value)}" for key, value in fields.items())
        return self.send_raw(payload)

    def send_raw(self, payload: str) -> bool:
        """Send ``payload`` verbatim as one datagram.

        Returns ``False`` (after logging at debug level) instead of raising
        on any socket error: a vanished socket, a full queue (``EAGAIN``; the
        socket is non-blocking) or an oversized message must not take the
        daemon down.
        """
        if not payload or not self.enabled:
            return False
        data = payload.encode("utf-8", errors="replace")
        with self._lock:
            address = self._address
            if address is None:  # forget() raced with us
                return False
            try:
                if self._sock is None:
                    self._sock = self._open_socket()
                self._sock.sendto(data, address)
            except OSError as exc:
                log.debug("sd_notify to %r failed: %s", address, exc)
                return False
        return True

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Release the socket; a later send opens a fresh one.

        Safe to call repeatedly and from any state.
        """
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def forget(self) -> None:
        """Close the socket and turn this notifier into a permanent no-op.

        Workers call this right after ``fork()``: the child inherits both the
        socket and this object, but only the master may speak for the
        service. Closing the inherited descriptor in the child does not affect
        the master's copy.
        """
        with self._lock:
            sock, self._sock = self._sock, None
            self._address = None
        if sock is not None:
            sock.close()

    @staticmethod
    def _open_socket() -> socket.socket:
        """Open the datagram socket; non-blocking so a send can never stall.

        Python sockets are close-on-exec by default, so exec'd helpers do not
        inherit it.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        return sock


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Return how often to call :meth:`Notifier.watchdog`, in seconds, or ``None``.

    systemd exports ``WATCHDOG_USEC`` (the timeout) when ``WatchdogSec=`` is
    set, plus ``WATCHDOG_PID`` naming the process it is meant for; if that PID
    is not ours the variables were inherited and must be ignored. Pinging at
    half the timeout is the period ``sd_watchdog_enabled(3)`` recommends: it
    tolerates one late ping without a spurious kill. Missing, zero or
    malformed values mean no watchdog.
    """
    raw_usec = environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
