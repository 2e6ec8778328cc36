"""The baseline: one plain paho-mqtt 2.x consumer process, as a routemqd worker would be without
routemqd. The handler runs inline in ``on_message`` (auto-ack: paho sends PUBACK when it returns).

Run as a process, one per slot: ``python bench/consumer.py --port P --client-id ID --filter F``.
It keeps a persistent session (MQTT 5: session expiry 1 h, like routemqd's default; 3.1.1: clean
session off), subscribes on every connect, and reports through stdout, one JSON line each:
``connected`` and ``subscribed`` with their wall-clock time, ``count`` (messages so far and the
time of the last one) every 0.1 s, and ``final`` before it exits. ``--setup`` subscribes and
leaves at once, keeping the session, so a backlog can be queued for it. A line on stdin (or EOF)
stops it; ``--end-session`` then ends the session (MQTT 5) so the broker forgets it.

``--record DIR`` makes the handler write ``<id> <sent_ns> <received_ns>`` per message to
``DIR/base-<pid>.txt`` (one unbuffered write each, like ``bench/handlers.py:latency``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPORT_EVERY = 0.1


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Consumer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.v5 = args.protocol == 5
        self.count = 0
        self.last = 0.0
        self.subscribed = threading.Event()
        self.record_fd: int | None = None
        if args.record:
            path = os.path.join(args.record, f"base-{os.getpid()}.txt")
            self.record_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=args.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else False,
        )
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_message = self.on_message_record if self.record_fd else self.on_message

    def connect(self) -> None:
        a = self.args
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            props.ReceiveMaximum = a.receive_max
            self.client.connect(a.host, a.port, 30, clean_start=a.setup, properties=props)
        else:
            self.client.connect(a.host, a.port, 30)
        self.client.loop_start()

    def on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        emit({"t": "connected", "at": time.time(), "rc": str(rc)})
        client.subscribe(self.args.filter, qos=self.args.qos)

    def on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, _rcs: Any, _p: Any) -> None:
        emit({"t": "subscribed", "at": time.time()})
        self.subscribed.set()

    def on_message(self, _c: mqtt.Client, _u: Any, _msg: mqtt.MQTTMessage) -> None:
        self.count += 1
        self.last = time.time()

    def on_message_record(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time_ns()
        ident, sent = msg.payload.split(b" ", 2)[:2]
        assert self.record_fd is not None
        os.write(self.record_fd, b"%s %s %d\n" % (ident, sent, now))
        self.count += 1
        self.last = now / 1e9

    def report(self, kind: str = "count") -> None:
        emit({"t": kind, "n": self.count, "last": self.last})

    def serve(self) -> None:
        last_n = -1
        while True:
            ready, _, _ = select.select([sys.stdin], [], [], REPORT_EVERY)
            if ready:
                sys.stdin.readline()
                return
            if self.count != last_n:
                last_n = self.count
                self.report()

    def leave(self, end_session: bool) -> None:
        if end_session and self.v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self.client.disconnect(properties=props)
        else:
            self.client.disconnect()
        self.client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="baseline paho-mqtt consumer")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--filter", required=True)
    p.add_argument("--protocol", type=int, choices=(4, 5), default=5)
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    p.add_argument("--receive-max", type=int, default=17)
    p.add_argument("--setup", action="store_true", help="subscribe, keep the session, exit")
    p.add_argument("--end-session", action="store_true")
    p.add_argument("--record", default="")
    args = p.parse_args(argv)
    c = Consumer(args)
    c.connect()
    if args.setup:
        if not c.subscribed.wait(30):
            emit({"t": "error", "reason": "no SUBACK within 30 s"})
            return 1
        c.leave(end_session=False)
        return 0
    c.serve()
    c.report()
    c.leave(end_session=args.end_session)
    c.report("final")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
