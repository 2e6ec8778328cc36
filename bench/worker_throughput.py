"""How fast does one worker slot drain a backlog, next to a bare paho subscriber?

Both consumers drain the same backlog: N QoS 1 messages of 100 bytes, queued in a persistent
session while the consumer was offline, from the moment the consumer connects until it has
handled the last one.

- baseline: a paho-mqtt 2.x client in this process, auto-ack, ``on_message`` does nothing;
- routemqd: one worker slot (``routemqd.examples.handlers:noop``, concurrency 1). The worker
  subscribes once and is stopped with SIGTERM (session kept); the backlog is published; the worker
  is started again. Heartbeats come only once a second, so the rate is taken over the time the
  worker was certainly busy: from its ``warm`` event (handler imported, about to connect) to the
  last heartbeat sent before ``handled`` reached N, with that heartbeat's ``handled`` count. The
  same rate counted from process start (interpreter start-up included) is printed too, and the
  worker's CPU time per message (user + system, from ``warm`` to the heartbeat that reports N).

``--handler`` and ``--middleware`` (repeatable) change the route, e.g. to measure what a
middleware chain costs: ``--middleware tests.handlers.hooked:passthrough``.

Run from the repository root: ``.venv/bin/python bench/worker_throughput.py [-n 20000] [-r 3]``.
The broker and every worker are stopped by PID on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from tests.support import manifests  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.processes import stop_tracked  # noqa: E402
from tests.support.traffic import Publisher  # noqa: E402
from tests.support.workers import WorkerProc  # noqa: E402

PAYLOAD_BYTES = 100
PROTOCOLS: dict[str, int] = {"MQTT 5": 5, "MQTT 3.1.1": 4}
WAIT = 120.0  # upper bound for any single phase


def payload(i: int) -> str:
    head = f"{i:010d}"
    return head + "x" * (PAYLOAD_BYTES - len(head))


def fill_backlog(broker: Broker, topic: str, n: int) -> None:
    pub = Publisher(*broker.address, topic_for=lambda i: topic, payload_for=payload)
    try:
        pub.publish_many(n)
        pub.wait_acked(timeout=WAIT)
    finally:
        pub.close()


# ----------------------------------------------------------------------------------- baseline


class RawSubscriber:
    """A persistent-session paho subscriber that only counts what it receives."""

    def __init__(self, broker: Broker, client_id: str, protocol: int, expected: int) -> None:
        self.broker = broker
        self.protocol = protocol
        self.expected = expected
        self.count = 0
        self.done = threading.Event()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        v5 = protocol == 5
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
        )
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, _c: Any, _u: Any, _msg: mqtt.MQTTMessage) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.done.set()

    def connect(self, clean_start: bool) -> None:
        host, port = self.broker.address
        if self.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            self.client.connect(host, port, 30, clean_start=clean_start, properties=props)
        else:
            self.client.connect(host, port, 30)
        self.client.loop_start()
        if not self.connected.wait(WAIT):
            raise RuntimeError("baseline subscriber: no CONNACK")

    def disconnect(self, end_session: bool = False) -> None:
        if end_session and self.protocol == 5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self.client.disconnect(properties=props)
        else:
            self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()


def run_baseline(broker: Broker, protocol: int, n: int, tag: str) -> float:
    topic = f"bench/raw/{tag}"
    sub = RawSubscriber(broker, f"bench-raw-{tag}", protocol, n)
    sub.connect(clean_start=True)
    sub.client.subscribe(topic, qos=1)
    if not sub.subscribed.wait(WAIT):
        raise RuntimeError("baseline subscriber: no SUBACK")
    sub.disconnect()

    fill_backlog(broker, topic, n)

    start = time.monotonic()
    sub.connect(clean_start=False)
    if not sub.done.wait(WAIT):
        raise RuntimeError(f"baseline subscriber got {sub.count} of {n} in {WAIT}s")
    elapsed = time.monotonic() - start
    sub.disconnect(end_session=True)
    return n / elapsed


# ----------------------------------------------------------------------------------- routemqd


def cpu_seconds(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def wait_handled(w: WorkerProc, n: int) -> tuple[float, float, int, float]:
    """Wait until the worker reports ``handled`` >= n. Returns the arrival time of ``warm`` and
    of the last heartbeat sent while it was still draining, with that heartbeat's count, and the
    worker's CPU seconds from ``warm`` to the heartbeat that reported n."""
    ps = psutil.Process(w.proc.pid)
    cpu_at_warm = 0.0
    warm_at: float | None = None
    last: tuple[float, int] | None = None
    seen = 0
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        w.poll_events()
        now = time.monotonic()
        for e in w.events[seen:]:
            if e.get("t") == "warm":
                warm_at = now
                cpu_at_warm = cpu_seconds(ps)
            elif e.get("t") == "hb" and warm_at is not None:
                handled = int(e["handled"])
                if handled >= n:
                    if last is None or last[1] == 0:
                        raise RuntimeError("drained within one heartbeat: use a larger -n")
                    return warm_at, last[0], last[1], cpu_seconds(ps) - cpu_at_warm
                last = (now, handled)
            elif e.get("t") == "boot_error":
                raise RuntimeError(f"worker failed to boot: {e}")
        seen = len(w.events)
        if w.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {w.proc.returncode}")
        time.sleep(0.002)
    raise RuntimeError(f"worker did not handle {n} messages in {WAIT}s")


def run_worker(
    broker: Broker,
    workdir: Path,
    protocol: int,
    n: int,
    tag: str,
    live: list[WorkerProc],
    route_keys: dict[str, Any],
) -> tuple[float, float, float]:
    """msgs/s from ``warm`` to the last message, and from process start to the last message;
    CPU microseconds per message."""
    topic = f"bench/w/{tag}"
    route = manifests.route("bench", topic, **route_keys)
    manifest = manifests.write(
        workdir / f"{tag}.yaml",
        broker.port,
        [route],
        protocol=protocol,
        logging={"level": "warning"},
    )
    first = WorkerProc(manifest, "bench", 0)
    live.append(first)
    first.wait_event("ready", timeout=WAIT)
    first.signal(signal.SIGTERM)  # keep the session: the backlog is queued in it
    if first.wait(WAIT) != 0:
        raise RuntimeError(f"worker exited with {first.proc.returncode} on SIGTERM")
    first.close()
    live.remove(first)

    fill_backlog(broker, topic, n)

    spawned = time.monotonic()
    second = WorkerProc(manifest, "bench", 0)
    live.append(second)
    warm_at, busy_until, handled, cpu = wait_handled(second, n)
    second.signal(signal.SIGUSR2)  # retire: end the session so the broker can forget it
    second.wait(WAIT)
    second.close()
    live.remove(second)
    return handled / (busy_until - warm_at), handled / (busy_until - spawned), cpu / n * 1e6


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=20_000)
    parser.add_argument("-r", "--repeats", type=int, default=3)
    parser.add_argument(
        "--handler", default="routemqd.examples.handlers:noop", help="the route's handler"
    )
    parser.add_argument(
        "--middleware", action="append", default=[], help="a middleware (repeat for a chain)"
    )
    parser.add_argument(
        "--protocol", choices=["5", "3.1.1", "both"], default="both", help="MQTT version(s)"
    )
    args = parser.parse_args(argv)
    n, repeats = args.messages, args.repeats
    route_keys: dict[str, Any] = {"handler": args.handler}
    if args.middleware:
        route_keys["middleware"] = args.middleware
    protocols = {
        label: v
        for label, v in PROTOCOLS.items()
        if args.protocol == "both" or label == f"MQTT {args.protocol}"
    }

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks below

    signal.signal(signal.SIGTERM, on_term)
    live: list[WorkerProc] = []
    with tempfile.TemporaryDirectory(prefix="routemqd-bench-") as tmp:
        broker = Broker(workdir=Path(tmp) / "broker")
        try:
            broker.start()
            print(
                f"backlog of {n} QoS 1 messages of {PAYLOAD_BYTES} bytes, "
                f"{repeats} repeats, medians (mosquitto pid {broker.pid}, port {broker.port})"
            )
            rows = []
            for label, protocol in protocols.items():
                base, warm, total, cpu = [], [], [], []
                for rep in range(repeats):
                    tag = f"p{protocol}-r{rep}"
                    base.append(run_baseline(broker, protocol, n, tag))
                    w_warm, w_total, w_cpu = run_worker(
                        broker, Path(tmp), protocol, n, tag, live, route_keys
                    )
                    warm.append(w_warm)
                    total.append(w_total)
                    cpu.append(w_cpu)
                    print(
                        f"  {label} run {rep + 1}: paho {base[-1]:8.0f} msg/s   "
                        f"routemqd {w_warm:8.0f} msg/s ({w_total:.0f} incl. start-up), "
                        f"{w_cpu:.1f} us CPU/msg",
                        flush=True,
                    )
                rows.append(
                    (
                        label,
                        statistics.median(base),
                        statistics.median(warm),
                        statistics.median(total),
                        statistics.median(cpu),
                    )
                )
            print()
            print(
                f"{'protocol':<11} {'paho msg/s':>11} {'routemqd msg/s':>15} {'ratio':>6} "
                f"{'us CPU/msg':>11}"
            )
            for label, b, w, t, c in rows:
                print(
                    f"{label:<11} {b:11.0f} {w:15.0f} {w / b:6.2f} {c:11.1f}"
                    f"   (incl. start-up {t:.0f})"
                )
        finally:
            for w in live:
                w.close()
            broker.stop()
            stop_tracked()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
