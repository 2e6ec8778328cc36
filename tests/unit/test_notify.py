"""Tests for routemqd.notify against real AF_UNIX datagram sockets.

A real receiving socket stands in for systemd, so the tests check the bytes
that actually cross the socket rather than a mocked ``sendto``.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from routemqd import notify
from routemqd.notify import Notifier, watchdog_interval

RECV_TIMEOUT = 2.0


def _receiver(address: str | bytes) -> socket.socket:
    """Bind a datagram socket the way systemd's notify socket is bound."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT)
    return sock


def _assert_nothing_pending(sock: socket.socket) -> None:
    """Fail if a datagram is waiting on ``sock``."""
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A receiver bound to a path in tmp_path, with the matching NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 108:  # sun_path limit
        pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
    sock = _receiver(str(path))
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    """A receiver on a unique abstract address, with the matching ``@name`` value."""
    name = f"routemqd-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    yield sock, "@" + name
    sock.close()


@pytest.fixture
def notifier(path_socket: tuple[socket.socket, str]) -> Iterator[Notifier]:
    """A notifier pointed at ``path_socket``."""
    _, env_value = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": env_value})
    yield n
    n.close()


def _recv(path_socket: tuple[socket.socket, str]) -> bytes:
    return path_socket[0].recv(4096)


# -- messages ----------------------------------------------------------------


def test_ready(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    assert notifier.ready() is True
    assert _recv(path_socket) == b"READY=1"


def test_ready_with_status_is_one_datagram(
    notifier: Notifier, path_socket: tuple[socket.socket, str]
) -> None:
    assert notifier.ready("serving 4 workers")
    assert _recv(path_socket) == b"READY=1\nSTATUS=serving 4 workers"
    _assert_nothing_pending(path_socket[0])


def test_reloading_carries_monotonic_usec(
    notifier: Notifier, path_socket: tuple[socket.socket, str]
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    lines = _recv(path_socket).decode().split("\n")
    assert len(lines) == 2
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after
    _assert_nothing_pending(path_socket[0])


def test_stopping(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    assert notifier.stopping()
    assert _recv(path_socket) == b"STOPPING=1"


def test_watchdog(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    assert notifier.watchdog()
    assert _recv(path_socket) == b"WATCHDOG=1"


def test_status(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    assert notifier.status("draining 2 workers")
    assert _recv(path_socket) == b"STATUS=draining 2 workers"


def test_status_is_a_single_line(
    notifier: Notifier, path_socket: tuple[socket.socket, str]
) -> None:
    """A newline would inject a second KEY=value pair (e.g. a forged READY=1)."""
    assert notifier.status("bad config\nREADY=1\r\n")
    assert _recv(path_socket) == b"STATUS=bad config READY=1"


def test_send_fields_in_order(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    assert notifier.send(STATUS="x", ERRNO=5, READY=True, EXTEND_TIMEOUT_USEC=10)
    assert _recv(path_socket) == b"STATUS=x\nERRNO=5\nREADY=1\nEXTEND_TIMEOUT_USEC=10"


def test_send_raw_is_verbatim(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    assert notifier.send_raw("FDSTORE=0\nSTATUS=ünïcode")
    assert _recv(path_socket) == "FDSTORE=0\nSTATUS=ünïcode".encode()


def test_empty_send_is_noop(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    assert notifier.send() is False
    assert notifier.send_raw("") is False
    _assert_nothing_pending(path_socket[0])


def test_abstract_socket(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, env_value = abstract_socket
    with Notifier.from_env({"NOTIFY_SOCKET": env_value}) as n:
        assert n.ready("up")
        assert n.watchdog()
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_socket_is_reused(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    notifier.watchdog()
    first = notifier._sock
    notifier.watchdog()
    assert first is not None
    assert notifier._sock is first
    assert not first.getblocking()
    assert _recv(path_socket) == b"WATCHDOG=1"
    assert _recv(path_socket) == b"WATCHDOG=1"


def test_close_then_send_reopens(
    notifier: Notifier, path_socket: tuple[socket.socket, str]
) -> None:
    notifier.watchdog()
    notifier.close()
    notifier.close()  # idempotent
    assert notifier._sock is None
    assert notifier.watchdog()
    assert _recv(path_socket) == b"WATCHDOG=1"
    assert _recv(path_socket) == b"WATCHDOG=1"


# -- disabled / failure modes --------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}, {"NOTIFY_SOCKET": "vsock:2:1"}],
)
def test_noop_without_usable_socket(environ: dict[str, str]) -> None:
    n = Notifier.from_env(environ)
    assert not n.enabled
    assert n.ready("x") is False
    assert n.reloading() is False
    assert n.stopping() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.send(READY=1) is False
    assert n.send_raw("READY=1") is False
    assert n._sock is None  # never even opened a socket
    n.close()
    n.forget()


def test_from_env_defaults_to_os_environ(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[socket.socket, str]
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket[1])
    with Notifier.from_env() as n:
        assert n.ready()
    assert _recv(path_socket) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier.from_env().enabled


def test_socket_path_disappears(tmp_path: Path) -> None:
    """systemd going away (or the path being removed) must not raise into the daemon."""
    path = tmp_path / "notify.sock"
    sock = _receiver(str(path))
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"

    sock.close()
    assert n.watchdog() is False  # path exists, nobody listening: ECONNREFUSED
    path.unlink()
    assert n.watchdog() is False  # ENOENT
    assert n.stopping() is False
    assert n.reloading() is False

    # A notify socket recreated at the same path is picked up again.
    sock = _receiver(str(path))
    try:
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()
        n.close()


def test_send_never_blocks_on_full_queue(
    notifier: Notifier, path_socket: tuple[socket.socket, str]
) -> None:
    """A receiver that stops reading fills up; sends must drop, not wait."""
    results = []
    start = time.monotonic()
    for _ in range(2000):
        results.append(notifier.watchdog())
        if not results[-1]:
            break
    elapsed = time.monotonic() - start
    assert False in results, "receive queue never filled up"
    assert elapsed < 1.0
    assert _recv(path_socket) == b"WATCHDOG=1"


def test_oversized_message_does_not_raise(notifier: Notifier) -> None:
    assert notifier.status("x" * (16 * 1024 * 1024)) is False


# -- fork safety -----------------------------------------------------------------


def test_forget_makes_noop(notifier: Notifier, path_socket: tuple[socket.socket, str]) -> None:
    notifier.watchdog()
    sock = notifier._sock
    notifier.forget()
    assert sock is not None
    assert sock.fileno() == -1  # closed
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier._sock is None
    assert _recv(path_socket) == b"WATCHDOG=1"
    _assert_nothing_pending(path_socket[0])


def test_other_pid_cannot_notify(
    monkeypatch: pytest.MonkeyPatch,
    notifier: Notifier,
    path_socket: tuple[socket.socket, str],
) -> None:
    """Even a worker that forgot to call forget() must not speak for the master."""
    real_pid = os.getpid()
    monkeypatch.setattr(notify.os, "getpid", lambda: real_pid + 1)
    assert not notifier.enabled
    assert notifier.ready() is False
    _assert_nothing_pending(path_socket[0])


def test_forked_child_does_not_notify(
    notifier: Notifier, path_socket: tuple[socket.socket, str]
) -> None:
    notifier.watchdog()  # the child inherits an open socket
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            if notifier.ready("child"):
                code = 1
            notifier.forget()
            if notifier.ready("child"):
                code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's socket survives the child's forget().
    assert notifier.ready("parent")
    assert _recv(path_socket) == b"WATCHDOG=1"
    assert _recv(path_socket) == b"READY=1\nSTATUS=parent"
    _assert_nothing_pending(path_socket[0])


# -- watchdog_interval -------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected


def test_watchdog_interval_pid_matches() -> None:
    environ = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(environ) == 15.0


def test_watchdog_interval_pid_mismatch() -> None:
    """Variables inherited from a parent that was the watchdog target are not ours."""
    environ = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(environ) is None


def test_watchdog_interval_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 2.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
