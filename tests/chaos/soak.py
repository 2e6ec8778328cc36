"""The chaos soak: steady QoS 1 traffic while a driver breaks things, and a ledger of every id.

Faults, chosen at random within bounds: SIGKILL a worker; SIGSTOP a worker for longer than its
heartbeat timeout (the master must kill and replace it); SIGHUP with a changed manifest (scale
the main route, swap its handler, move the side route to another topic); a graceful broker
restart; messages whose handler raises (they must reach the dead-letter topic). Afterwards every
id the broker acknowledged must have been handled or dead-lettered. Ids acknowledged while the
broker was restarting are reported apart: Mosquitto 2.0.11 forgets ``$share`` subscriptions over
a restart, so what arrives before the workers re-subscribe is the broker's loss, not ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import manifests
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.traffic import client, published

HEARTBEAT_TIMEOUT = 3
ACK_GRACE = 60.0  # how long the publisher waits for PUBACKs once it has stopped
DELAYED_AFTER = 10.0  # seconds from publish to handling that we report as delayed


@dataclass
class Report:
    seconds: float
    rate: float
    published: int = 0
    acked: int = 0
    handled: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    lost_ours: list[str] = field(default_factory=list)
    lost_broker_window: list[str] = field(default_factory=list)
    delayed: int = 0
    max_delay: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    restarts_seen: int = 0
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (wall time, fault)
    lost_context: dict[str, str] = field(default_factory=dict)

    @property
    def fault_total(self) -> int:
        return sum(self.faults.values())

    def render(self) -> str:
        lines = [
            f"chaos soak: {self.seconds:.0f}s at {self.rate:.0f} msg/s QoS 1",
            f"  faults injected   {self.fault_total}  "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())),
            f"  published         {self.published}",
            f"  acked by broker   {self.acked}",
            f"  handled           {self.handled}",
            f"  dead-lettered     {self.dead_lettered}  (handler raised on purpose)",
            f"  duplicates        {self.duplicates}  (at-least-once redeliveries)",
            f"  delayed >{DELAYED_AFTER:.0f}s      {self.delayed}  (max {self.max_delay:.1f}s)",
            f"  lost, broker restart window  {len(self.lost_broker_window)}  (Mosquitto 2.0.11)",
            f"  LOST, ours        {len(self.lost_ours)}"
            + (f"  e.g. {self.lost_ours[:10]}" if self.lost_ours else ""),
        ]
        for ident in self.lost_ours[:10]:
            lines.append(f"    {ident}: {self.lost_context.get(ident, '')}")
        return "\n".join(lines)


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[tuple[str, int, bool, int, str]]:
        out = []
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            p = line.split()
            if len(p) == 5:
                out.append((p[0], int(p[1]), p[2] == "1", int(p[3]), p[4]))
        return out


class DeadLetters:
    """Collects the ids that reached the dead-letter topic."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()  # the client's thread adds while the report reads
        ready = threading.Event()
        self.client = client(*broker.address, client_id="chaos-dlq")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        # a session that outlives a broker restart: dead letters published while this collector
        # reconnects must wait for it, or the test would count them as lost
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(*broker.address, 30, clean_start=False, properties=props)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._ids.add(m.payload.decode().partition(":")[0])

    @property
    def ids(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._ids)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class TimedPublisher:
    """Numbered QoS 1 messages at a steady rate; remembers when each was published."""

    def __init__(self, broker: Broker, rate: float, rng: random.Random) -> None:
        self.broker = broker
        self.rate = rate
        self.rng = rng
        self.infos: list[tuple[str, float, mqtt.MQTTMessageInfo]] = []
        self.acked_at: dict[int, float] = {}  # index in infos -> when the PUBACK was seen
        self._unacked: list[int] = []
        self._lock = threading.Lock()  # never held while calling into paho
        self.side_topic = "side/a"
        self._stop = threading.Event()
        self.client = client(*broker.address, client_id="chaos-publisher")
        self.client.connect(*broker.address, 30, clean_start=True)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.watcher = threading.Thread(target=self._watch_acks, daemon=True)

    def _watch_acks(self) -> None:
        """Note when each PUBACK arrives (to 20 ms): a publish queued by the client while the
        broker was down is accepted only after it came back, whenever publish() was called.
        Once stopped it goes on until every publish is acked, or gives up after ACK_GRACE."""
        give_up_at: float | None = None
        while True:
            now = time.time()
            with self._lock:
                pending, self._unacked = self._unacked, []
            acked = {i for i in pending if published(self.infos[i][2])}
            with self._lock:
                self.acked_at.update(dict.fromkeys(acked, now))
                self._unacked = [i for i in pending if i not in acked] + self._unacked
                drained = not self._unacked
            if self._stop.is_set():
                if drained:
                    return
                if give_up_at is None:
                    give_up_at = time.monotonic() + ACK_GRACE
                elif time.monotonic() > give_up_at:
                    return
            time.sleep(0.02)

    def _payload(self, i: int) -> str:
        r = self.rng.random()
        if r < 0.01:
            return f"{i}:raise"
        if r < 0.03:
            return f"{i}:sleep=0.2"
        return str(i)

    def _run(self) -> None:
        interval = 1.0 / self.rate
        t = time.monotonic()
        i = 0
        while not self._stop.is_set():
            if i % 10 == 9:  # the side route: not counted, its topic moves under reloads
                self.client.publish(self.side_topic, f"s{i}", qos=1)
            else:
                topic = f"orders/{i % 50}" if i % 10 < 7 else f"ordered/{i % 5}"
                info = self.client.publish(topic, self._payload(i), qos=1)
                self.infos.append((str(i), time.time(), info))
                with self._lock:
                    self._unacked.append(len(self.infos) - 1)
            i += 1
            t += interval
            delay = t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def start(self) -> None:
        self.thread.start()
        self.watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def wait_acked(self) -> None:
        """Returns once the watcher has seen every PUBACK (or given up), so that the times it
        noted no longer change while the report reads them."""
        self.watcher.join(ACK_GRACE + 5)

    def ack_times(self) -> dict[int, float]:
        with self._lock:
            return dict(self.acked_at)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _manifest(path: Path, port: int, main_workers: int, main_handler: str, side_topic: str) -> None:
    common = {
        "heartbeat_timeout": HEARTBEAT_TIMEOUT,
        "dead_letter_topic": "chaos/dead",
        "max_attempts": 4,
    }
    manifests.write(
        path,
        port,
        [
            manifests.route(
                "main",
                "orders/{n}",
                handler=main_handler,
                shared=True,
                workers=main_workers,
                **common,
            ),
            manifests.route("ordered", "ordered/+", handler="tests.chaos.handlers:work", **common),
            manifests.route(
                "side",
                side_topic,
                handler="tests.chaos.handlers:work",
                shared=True,
                workers=2,
                **common,
            ),
        ],
        supervisor={
            "graceful_timeout": 10,
            "health_interval": 0.5,
            "healthy_after": 2,
            "failure_limit": 20,
            "failed_cooldown": 2,
            "backoff_max": 1,
        },
    )


def run_soak(
    tmp: Path,
    broker: Broker,
    daemon_factory: Any,
    seconds: float,
    rate: float,
    fault_every: tuple[float, float],
    seed: int | None = None,
) -> Report:
    rng = random.Random(seed)
    manifest = tmp / "routemq.yaml"
    state = {"workers": 3, "handler": "tests.chaos.handlers:work", "side": "side/a"}
    _manifest(manifest, broker.port, state["workers"], state["handler"], state["side"])
    ledger_path = tmp / "chaos-ledger"
    daemon: Daemon = daemon_factory(manifest, env={"ROUTEMQD_CHAOS_LEDGER": str(ledger_path)})
    daemon.wait_ready(timeout=60)
    dead = DeadLetters(broker, "chaos/dead")
    pub = TimedPublisher(broker, rate, rng)
    report = Report(seconds=seconds, rate=rate)
    # every kind of fault at least once, early, then at random
    opening = ["kill", "reload", "stop", "reload", "broker", "reload", "kill"]
    reloads = ["scale", "handler", "topic"]
    broker_windows: list[tuple[float, float]] = []
    stopped: dict[int, float] = {}
    pub.start()
    end = time.monotonic() + seconds
    next_fault = time.monotonic() + rng.uniform(*fault_every)
    try:
        while time.monotonic() < end:
            time.sleep(0.05)
            now = time.monotonic()
            for pid, until in list(stopped.items()):
                if now >= until:  # the master has killed it by now; resume if it is still there
                    _signal(pid, signal.SIGCONT)
                    del stopped[pid]
            if now < next_fault:
                continue
            next_fault = now + rng.uniform(*fault_every)
            if opening:
                kind = opening.pop(0)
            else:
                kind = rng.choices(
                    ["kill", "stop", "reload", "broker"], weights=[60, 10, 25, 5], k=1
                )[0]
            if kind == "broker" and (
                report.faults["broker"] >= max(1, seconds // 60) or now > end - 5
            ):
                kind = "kill"
            try:
                status = daemon.status()
            except OSError:
                continue
            live = [s for s in status["slots"] if s["pid"] and s["state"] == "ready"]
            if kind in ("kill", "stop") and live:
                victim = rng.choice(live)["pid"]
                if kind == "kill":
                    _signal(victim, signal.SIGKILL)
                elif not stopped:
                    _signal(victim, signal.SIGSTOP)
                    stopped[victim] = now + HEARTBEAT_TIMEOUT + 4
                else:
                    continue
            elif kind == "reload":
                what = reloads.pop(0) if reloads else rng.choice(["scale", "handler", "topic"])
                if what == "scale":
                    state["workers"] = rng.choice([w for w in (2, 3, 4) if w != state["workers"]])
                elif what == "handler":
                    state["handler"] = (
                        "tests.chaos.handlers:work_v2"
                        if state["handler"].endswith(":work")
                        else "tests.chaos.handlers:work"
                    )
                else:
                    state["side"] = "side/b" if state["side"] == "side/a" else "side/a"
                    pub.side_topic = state["side"]
                _manifest(manifest, broker.port, state["workers"], state["handler"], state["side"])
                daemon.signal(signal.SIGHUP)
                kind = f"reload-{what}"
            elif kind == "broker":
                t0 = time.time()
                broker.restart()
                daemon.wait_for(
                    lambda s: all(x["connected"] for x in s["slots"] if x["pid"]),
                    timeout=60,
                    what="workers reconnected",
                )
                broker_windows.append((t0, time.time() + 1.0))
            else:
                continue
            report.faults[kind] += 1
            report.timeline.append((time.time(), kind))
    finally:
        pub.stop()
        for pid in stopped:
            _signal(pid, signal.SIGCONT)
    pub.wait_acked()
    # let the pool settle and drain what is queued
    daemon.wait_ready(timeout=90)
    acked = {ident: t for ident, t, info in pub.infos if published(info)}
    ack_time = {pub.infos[i][0]: t for i, t in pub.ack_times().items()}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        handled = {e[0] for e in Ledger(ledger_path).entries()}
        if not set(acked) - handled - dead.ids:
            break
        time.sleep(0.5)
    entries = Ledger(ledger_path).entries()
    dead_ids = dead.ids
    handled_at: dict[str, int] = {}
    counts: Counter[str] = Counter()
    for ident, _pid, _dup, t_ns, _tag in entries:
        counts[ident] += 1
        handled_at.setdefault(ident, t_ns)
    report.published = len(pub.infos)
    report.acked = len(acked)
    report.handled = len(set(acked) & set(handled_at))
    report.dead_lettered = len(set(acked) & dead_ids)
    report.duplicates = sum(c - 1 for c in counts.values() if c > 1)
    for ident, t_pub in acked.items():
        if ident in handled_at:
            delay = handled_at[ident] / 1e9 - t_pub
            report.max_delay = max(report.max_delay, delay)
            if delay > DELAYED_AFTER:
                report.delayed += 1
        elif ident not in dead_ids:
            t_ack = ack_time.get(ident, t_pub)
            in_window = any(a <= t_pub <= b or a <= t_ack <= b for a, b in broker_windows)
            (report.lost_broker_window if in_window else report.lost_ours).append(ident)
            near = [
                f"{kind}@{t - t_pub:+.2f}s" for t, kind in report.timeline if -10 <= t - t_pub <= 5
            ]
            report.lost_context[ident] = f"published {t_pub:.3f}; faults near: {near}"
    report.restarts_seen = sum(s["restarts"] for s in daemon.status()["slots"])
    (tmp / "chaos-report.json").write_text(
        json.dumps(
            {
                **{k: v for k, v in report.__dict__.items() if k != "faults"},
                "faults": dict(report.faults),
            },
            default=list,
        )
    )
    dead.close()
    pub.close()
    return report


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
