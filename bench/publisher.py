"""The one publisher every benchmark case uses, for routemqd and the baseline alike.

A bare MQTT 3.1.1 client on a raw socket: PUBLISH packets are built from a prepared header and
written in batches, and a reader thread counts PUBACKs. It costs far less CPU per message than a
paho publisher, which leaves the two cores to the broker and the consumers being measured.

Payloads are exactly ``--size`` bytes: ``<id:010d> `` then, with ``--stamp``, the send time as
``time.time_ns()`` and a space, padded with ``x``. Handlers take the id (and the stamp) from the
first space-separated fields.

Run as a process: ``python bench/publisher.py --port P --topic T --count N [--rate R]``. Prints
one JSON line ``{"t": "connected"}`` after CONNACK and one ``{"t": "done", ...}`` at the end with
the wall-clock time of the first and last send, how many were sent and acknowledged, and the ids
the broker never acknowledged. Publishing stops after ``--count`` messages (0: no limit) or when a
line (or EOF) arrives on stdin; then it waits up to ``--ack-timeout`` seconds for the PUBACKs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

CONNACK, PUBACK, PINGRESP = 0x20, 0x40, 0xD0
MAX_PACKET_ID = 65535


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(s: str) -> bytes:
    data = s.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str) -> bytes:
    # protocol name, level 4 (3.1.1), flags: clean session, keepalive 0 (none)
    body = mqtt_string("MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big")
    body += mqtt_string(client_id)
    return bytes([0x10]) + varint(len(body)) + body


def parse_acks(buf: bytes) -> tuple[list[int], bytes]:
    """PUBACK packet ids in ``buf`` and the bytes of an incomplete packet left at its end."""
    whole = len(buf) - len(buf) % 4
    if buf[0:whole:4].count(PUBACK) == whole // 4 and buf[1:whole:4].count(2) == whole // 4:
        return [pid for _, pid in struct.iter_unpack(">HH", buf[:whole])], buf[whole:]
    pos, acks = 0, []
    while len(buf) - pos >= 2:
        # every packet the broker sends this client has a one-byte remaining length
        length = buf[pos + 1]
        if len(buf) - pos < 2 + length:
            break
        if buf[pos] & 0xF0 == PUBACK:
            acks.append(int.from_bytes(buf[pos + 2 : pos + 4], "big"))
        pos += 2 + length
    return acks, buf[pos:]


class RawPublisher:
    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        qos: int,
        size: int,
        stamp: bool,
        window: int,
        start_id: int,
        client_id: str,
    ) -> None:
        self.topic = topic
        self.qos = qos
        self.size = size
        self.stamp = stamp
        self.window = min(window, MAX_PACKET_ID - 1)
        self.next_id = start_id
        self.start_id = start_id
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = threading.Condition()
        self.inflight: dict[int, int] = {}  # packet id -> message id
        self.acked = 0
        self.closed = False
        self.pid_counter = 0
        topic_bytes = mqtt_string(topic)
        remaining = len(topic_bytes) + (2 if qos else 0) + size
        self.head = bytes([0x30 | (qos << 1)]) + varint(remaining) + topic_bytes
        self.pad = b"x" * size
        self.sock.sendall(connect_packet(client_id))
        self.sock.settimeout(None)
        first = self._recv_exact(4)
        if first[0] != CONNACK or first[3] != 0:
            raise RuntimeError(f"broker refused the connection: {first!r}")
        self.reader = threading.Thread(target=self._read_loop, name="acks", daemon=True)
        self.reader.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                acks, buf = parse_acks(buf)
                if acks:
                    with self.lock:
                        for pid in acks:
                            if self.inflight.pop(pid, None) is not None:
                                self.acked += 1
                        self.lock.notify_all()
        except OSError:
            pass
        finally:
            with self.lock:
                self.closed = True
                self.lock.notify_all()

    def _payload(self, ident: int) -> bytes:
        if self.stamp:
            head = f"{ident:010d} {time.time_ns()} ".encode()
        else:
            head = f"{ident:010d} ".encode()
        return head + self.pad[: self.size - len(head)]

    def _next_pid(self) -> int:
        self.pid_counter = self.pid_counter % MAX_PACKET_ID + 1
        return self.pid_counter

    def send(self, k: int) -> int:
        """Send up to ``k`` messages (fewer if the QoS 1 window is full); returns how many."""
        if self.qos == 0:
            packets = []
            for _ in range(k):
                packets.append(self.head + self._payload(self.next_id))
                self.next_id += 1
            self.sock.sendall(b"".join(packets))
            return k
        with self.lock:
            while len(self.inflight) >= self.window and not self.closed:
                self.lock.wait(0.5)
            if self.closed:
                raise ConnectionError("broker closed the connection")
            k = min(k, self.window - len(self.inflight))
            packets = []
            for _ in range(k):
                pid = self._next_pid()
                while pid in self.inflight:
                    pid = self._next_pid()
                self.inflight[pid] = self.next_id
                packets.append(self.head + pid.to_bytes(2, "big") + self._payload(self.next_id))
                self.next_id += 1
        self.sock.sendall(b"".join(packets))
        return k

    def wait_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.inflight and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.lock.wait(min(left, 0.5))

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.reader.join(5)
        self.sock.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    pub = RawPublisher(
        args.host,
        args.port,
        args.topic,
        args.qos,
        args.size,
        args.stamp,
        args.window,
        args.start_id,
        args.client_id or f"bench-pub-{os.getpid()}",
    )
    emit({"t": "connected"})
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
    count, rate = args.count, args.rate
    batch = max(1, args.batch)
    sent = 0
    t_first = time.time()
    start = time.monotonic()
    while not stop.is_set() and (count == 0 or sent < count):
        want = batch if count == 0 else min(batch, count - sent)
        if rate > 0:
            due = int((time.monotonic() - start) * rate) + 1 - sent
            if due <= 0:
                time.sleep(max(0.0, min(0.0005, sent / rate - (time.monotonic() - start))))
                continue
            want = min(want, due)
        sent += pub.send(want)
    t_last = time.time()
    if args.qos:
        pub.wait_acked(args.ack_timeout)
    with pub.lock:
        unacked = sorted(pub.inflight.values()) if args.qos else []
        acked = pub.acked
    pub.close()
    return {
        "t": "done",
        "sent": sent,
        "acked": acked if args.qos else sent,
        "unacked": unacked,
        "start_id": pub.start_id,
        "t_first": t_first,
        "t_last": t_last,
        "rate": sent / max(1e-9, t_last - t_first),
    }


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="raw MQTT 3.1.1 benchmark publisher")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    p.add_argument("--count", type=int, default=0, help="messages to send; 0: until stdin says")
    p.add_argument("--rate", type=float, default=0, help="messages/s; 0: as fast as possible")
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--stamp", action="store_true", help="embed time.time_ns() in the payload")
    p.add_argument("--window", type=int, default=2000, help="QoS 1 messages awaiting PUBACK")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--start-id", type=int, default=0)
    p.add_argument("--client-id", default="")
    p.add_argument("--ack-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    emit(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
