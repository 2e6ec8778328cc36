"""The link's buffered reads and keepalive guard, and the paho 2.2 internals they rely on."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from routemqd.worker.drivers import Backoff
from routemqd.worker.link import BufferedClient, Link
from routemqd.worker.runners import QOS0_INBOX_LIMIT, PoolRunner, Qos0Budget
from tests.unit.test_worker_delivery import FakeLink, Raw, make_spec


def test_paho_internals_the_link_relies_on_exist() -> None:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    for name in ("_sock_recv", "_send_pingreq", "_sock_close", "_call_socket_register_write"):
        assert callable(getattr(client, name)), name
    assert hasattr(client, "_sock") and hasattr(client, "_in_packet")


class FakeSock:
    def __init__(self, chunks: list[bytes], pending: int = 0) -> None:
        self.chunks = chunks
        self.recvs = 0
        self._pending = pending

    def recv(self, n: int) -> bytes:
        self.recvs += 1
        if not self.chunks:
            raise BlockingIOError()
        return self.chunks.pop(0)

    def pending(self) -> int:
        return self._pending

    def close(self) -> None:
        pass


def test_small_reads_are_served_from_one_recv() -> None:
    client = BufferedClient(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    sock = FakeSock([b"\x30\x05hello" * 3])
    client._sock = sock  # type: ignore[assignment]
    assert client._sock_recv(1) == b"\x30"
    assert client._sock_recv(1) == b"\x05"
    assert client._sock_recv(5) == b"hello"
    assert client.buffered()
    assert client._sock_recv(100) == b"\x30\x05hello" * 2
    assert sock.recvs == 1 and not client.buffered()
    try:
        client._sock_recv(1)
    except BlockingIOError:
        pass
    else:
        raise AssertionError("an empty socket must raise BlockingIOError like paho expects")


def test_a_new_socket_never_sees_the_old_ones_bytes() -> None:
    client = BufferedClient(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    client._sock = FakeSock([b"oldold"])  # type: ignore[assignment]
    assert client._sock_recv(3) == b"old"
    client._sock = FakeSock([b"new"])  # type: ignore[assignment]
    assert client._sock_recv(10) == b"new"


def test_tls_pending_bytes_count_as_buffered() -> None:
    client = BufferedClient(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    client._sock = FakeSock([], pending=10)  # type: ignore[assignment]
    assert client.buffered()


class Observer:
    def __getattr__(self, name: str) -> Any:
        return lambda *a: None


def _connected_link(tmp_path: Path) -> tuple[Link, socket.socket]:
    spec = make_spec(tmp_path)
    link = Link(spec, Observer())  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    link.client._sock = ours  # type: ignore[assignment]
    link.client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    link.connected = True
    return link, theirs


def test_guard_pings_only_when_the_socket_thread_is_away(tmp_path: Path) -> None:
    link, broker_end = _connected_link(tmp_path)
    keepalive = link.spec.broker.keepalive
    now = time.monotonic()
    link.serviced_at = now
    assert not link.keep_alive_if_starved(now)  # just serviced
    link.serviced_at = now - keepalive  # a handler has held the socket thread for a keepalive
    held = threading.Event()
    release = threading.Event()

    def socket_thread_in_paho() -> None:
        with link.lock:
            held.set()
            release.wait(5)

    t = threading.Thread(target=socket_thread_in_paho)
    t.start()
    held.wait(5)
    assert not link.keep_alive_if_starved(now)  # never while the socket thread is in paho
    release.set()
    t.join(5)
    assert link.keep_alive_if_starved(now)
    assert broker_end.recv(16) == b"\xc0\x00"  # PINGREQ, written whole
    assert not link.keep_alive_if_starved(now + 0.1)  # at most one ping per half keepalive
    broker_end.close()


def test_the_guard_pings_while_an_inline_handler_runs_and_the_lock_comes_back(
    tmp_path: Path,
) -> None:
    link, broker_end = _connected_link(tmp_path)
    keepalive = link.spec.broker.keepalive
    pinged: list[bool] = []

    def handler(message: object) -> None:
        # the socket thread is inside the handler, and has been for a keepalive: the lock is
        # free for the guard
        link.serviced_at = time.monotonic() - keepalive
        pinged.append(link.keep_alive_if_starved(time.monotonic()))

    with link.lock:  # the socket thread holds it while paho dispatches on_message
        assert link.run_unlocked(handler, object()) is None
        assert link.lock._is_owned()  # type: ignore[attr-defined]
        assert time.monotonic() - link.serviced_at < 1  # the socket thread is back
        error = link.run_unlocked(lambda m: 1 / 0, object())
    assert pinged == [True]
    assert broker_end.recv(16) == b"\xc0\x00"
    assert isinstance(error, ZeroDivisionError)
    broker_end.close()


def test_publish_never_writes_from_the_callers_thread(tmp_path: Path) -> None:
    link, broker_end = _connected_link(tmp_path)
    woken: list[int] = []
    link.wake = lambda: woken.append(1)
    link.publish("a/b", b"x", 1, False, None)
    assert link.want_write() and woken
    broker_end.setblocking(False)
    try:
        broker_end.recv(16)
    except BlockingIOError:
        pass
    else:
        raise AssertionError("publish() wrote to the socket itself")
    link.write()
    assert broker_end.recv(64)[:1] == b"\x32"  # PUBLISH QoS 1, written by the socket's owner
    broker_end.close()


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    b = Backoff(0.1, 1.0, random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    assert 0.1 <= delays[0] <= 0.15
    assert all(1.0 <= d <= 1.5 for d in delays[5:])
    b.reset()
    assert b.next_delay() <= 0.15


def test_qos0_budget_bounds_count_but_always_fits_one() -> None:
    budget = Qos0Budget()
    assert budget.take(10**9)  # one message always fits, however large
    budget.give(10**9)
    for _ in range(QOS0_INBOX_LIMIT):
        assert budget.take(1)
    assert not budget.take(1)


def test_pool_hands_a_pass_over_as_one_batch(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    seen: list[int] = []
    done = threading.Event()

    class Acks:
        link = FakeLink(spec)

        def begin(self, state: Any, raw: Any) -> Any:
            return raw

        def finish(self, d: Any, error: Any) -> None:
            seen.append(d.mid)
            if len(seen) == 3:
                done.set()

    def handler(message: Any) -> None:
        pass

    class D(Raw):
        message = None

    pool = PoolRunner(handler, Acks(), 2)  # type: ignore[arg-type]
    pool.start()
    for mid in (1, 2, 3):
        assert pool.submit(D(mid))
    assert pool.queued() == 3 and not seen
    pool.flush()
    assert done.wait(5)
    assert sorted(seen) == [1, 2, 3]
    pool.stop(5)
    assert not any(t.is_alive() for t in pool.threads)


class SendSock(FakeSock):
    def __init__(self) -> None:
        super().__init__([])
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)


def test_queued_acknowledgements_leave_in_one_send() -> None:
    client = BufferedClient(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    client.on_socket_register_write = lambda *_: None  # queue only, as the link does
    sock = SendSock()
    client._sock = sock  # type: ignore[assignment]
    client._send_puback(1)
    client._send_puback(2)
    client._packet_queue(mqtt.PUBLISH | 2, b"\x32\x04\x00\x01tx", 7, 1)
    client._send_puback(3)
    client._send_puback(4)
    pubacks = [bytes([0x40, 2, 0, mid]) for mid in (1, 2, 3, 4)]

    client.loop_write()

    # order kept, a publish is never merged, each run of acknowledgements is one write
    assert sock.sent == [pubacks[0] + pubacks[1], b"\x32\x04\x00\x01tx", pubacks[2] + pubacks[3]]
    assert not client.want_write()


def test_a_partly_written_packet_is_resumed_alone() -> None:
    client = BufferedClient(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    client.on_socket_register_write = lambda *_: None
    sock = SendSock()
    client._sock = sock  # type: ignore[assignment]
    client._send_puback(1)
    client._send_puback(2)
    client._send_puback(3)
    first = client._out_packet[0]
    first["pos"], first["to_process"] = 1, 3  # a write stopped after its first byte

    client.loop_write()

    assert sock.sent == [b"\x02\x00\x01", bytes([0x40, 2, 0, 2, 0x40, 2, 0, 3])]
