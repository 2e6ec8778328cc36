"""How a message is acknowledged, dead-lettered or given up: the one place that decides.

A message's life in a worker: ``begin()`` (the runner is about to call the handler: mark it on
the in-flight board, or give up a known worker-killer), the handler, ``finish()`` (count it, log
and dead-letter a failure), then ``_settle()``: PUBACK once everything the handler (or the
dead-letter) published is acknowledged by the broker. A message whose publishes are still on
their way is parked and settled by the socket thread on a later pass; one whose publishes cannot
be confirmed (the connection dropped, or 30 s passed) is left unacknowledged, so the broker
delivers it again from the session.

Acknowledging touches paho, so it only ever happens on the socket thread with the link's lock
held; a pool runner's ``finish()`` queues the message and wakes the socket thread instead.
"""

from __future__ import annotations

import base64
import bisect
import json
import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from routemqd.board import InflightBoard, fingerprint
from routemqd.log import redact
from routemqd.manifest import Route
from routemqd.message import Message
from routemqd.worker.link import Link, PublishTooLarge, published
from routemqd.worker.stats import DURATION_BUCKETS, RunnerState

CONFIRM_TIMEOUT = 30.0  # how long a message waits for its publishes' PUBACKs before giving up


@dataclass(slots=True)
class Delivery:
    raw: Any  # paho's MQTTMessage
    message: Message
    state: RunnerState
    started: float
    resolves: bytes | None = None  # a fingerprint the master may forget once this is acked
    finished: float = 0.0


class Acknowledger:
    def __init__(
        self,
        link: Link,
        route: Route,
        log: Any,
        board: InflightBoard | None = None,
        attempts: Mapping[bytes, int] | None = None,
    ) -> None:
        self.link = link
        self.route = route
        self.log = log
        self.board = board
        self.attempts: Mapping[bytes, int] = attempts or {}
        self.parked: deque[Delivery] = deque()  # waiting for the broker to confirm publishes
        self.done: deque[Delivery] = deque()  # finished by pool runners, not yet settled
        self.unacked = 0  # QoS 1 messages received and neither acknowledged nor given up

    # -------------------------------------------------------------------------- begin

    def message(self, raw: Any) -> Message:
        """The handler's view of a delivery; kept cheap, it runs once per message."""
        try:
            topic = raw.topic
        except UnicodeDecodeError:
            topic = raw._topic.decode("utf-8", "replace")
        return Message(
            topic=topic,
            payload=raw.payload,
            qos=raw.qos,
            retain=bool(raw.retain),
            dup=bool(raw.dup),
            mid=raw.mid,
            properties=raw.properties,
            route=self.route.name,
            attempt=2 if raw.dup else 1,
            publish=self.link.publish,
            pattern=self.route.topic,
        )

    def begin(self, state: RunnerState, raw: Any) -> Delivery | None:
        """Mark the message as in flight; None if it is a known worker-killer (then it has been
        dead-lettered or dropped, and will be acknowledged)."""
        message = self.message(raw)
        state.fingerprint = None
        resolves = None
        if self.board is not None and raw.qos > 0:
            digest = fingerprint(message.topic, message.payload)
            prior = self.attempts.get(digest, 0)
            if prior:
                message.attempt = prior + 1
                if prior >= self.route.max_attempts:
                    self._give_up_poison(state, raw, message, digest, prior)
                    return None
                resolves = digest
            state.fingerprint = digest
            self.board.set(state.cell, digest)
        start = time.monotonic()
        state.busy_topic = message.topic
        state.stuck_reported = False
        state.busy_since = start
        return Delivery(raw, message, state, start, resolves)

    def _give_up_poison(
        self, state: RunnerState, raw: Any, message: Message, digest: bytes, prior: int
    ) -> None:
        error = f"message took down {prior} workers (max_attempts {self.route.max_attempts})"
        state.failed += 1
        state.last_error = error
        self.log.error(
            "poison_message",
            topic=message.topic,
            attempts=prior,
            action="dead-lettered" if self.route.dead_letter_topic else "dropped",
        )
        if self.route.dead_letter_topic:
            self._dead_letter(message, error)
            state.dead_lettered += 1
        self._hand_over(Delivery(raw, message, state, time.monotonic(), digest))

    # ------------------------------------------------------------------------- finish

    def finish(self, d: Delivery, error: BaseException | None) -> None:
        """The handler returned (or raised). Called on the runner's thread."""
        state = d.state
        now = time.monotonic()
        state.busy_since = None
        elapsed = now - d.started
        state.buckets[bisect.bisect_left(DURATION_BUCKETS, elapsed)] += 1
        state.duration_sum += elapsed
        if error is not None:
            state.failed += 1
            # status and dead letters carry it too: scrub secrets here, not only in the log
            state.last_error = redact(f"{type(error).__name__}: {error}")[:500]
            self.log.error(
                "handler_failed",
                topic=d.message.topic,
                mid=d.raw.mid,
                attempt=d.message.attempt,
                error=state.last_error,
                traceback="".join(traceback.format_exception(error)[-12:]),
            )
            if self.route.dead_letter_topic:
                self._dead_letter(d.message, state.last_error)
                state.dead_lettered += 1
        else:
            state.handled += 1
        if self.board is not None and state.fingerprint is not None:
            # the handler is done: a death from here on is not this message's fault
            self.board.clear(state.cell)
            state.fingerprint = None
        self._hand_over(d)

    def _hand_over(self, d: Delivery) -> None:
        d.finished = time.monotonic()
        if self.link.on_socket_thread():
            with self.link.lock:
                if not self._settle(d, d.finished):
                    self.parked.append(d)
        else:
            self.done.append(d)
            self.link.wake()

    # ------------------------------------------------------------------------- settle

    def settle(self) -> None:
        """The socket thread's pass (lock held): what pool runners finished, and what waits."""
        now = time.monotonic()
        done = self.done
        while done:
            d = done.popleft()
            if not self._settle(d, now):
                self.parked.append(d)
        if self.parked:
            waiting = self.parked
            self.parked = deque(d for d in waiting if not self._settle(d, now))

    def _settle(self, d: Delivery, now: float) -> bool:
        """Acknowledge ``d`` if its publishes are confirmed; True when nothing is left to do."""
        for info in d.message.pending:
            state = published(info)
            if state is None:
                if self.link.connected and now - d.finished < CONFIRM_TIMEOUT:
                    return False  # still on its way: look again on a later pass
                state = False
            if state is False:
                # Not confirmed: leave the message unacked so it comes back with the session.
                self._forget(d)
                return True
        if d.raw.qos > 0:
            self.link.ack(d.raw.mid, d.raw.qos)
            self._forget(d)
        if d.resolves is not None:
            d.state.resolved.append(d.resolves)
        return True

    def _forget(self, d: Delivery) -> None:
        if d.raw.qos > 0 and self.unacked > 0:
            self.unacked -= 1

    def connection_lost(self) -> None:
        """The broker will deliver again whatever was not acknowledged: nothing waits for it."""
        self.parked.clear()
        self.unacked = 0

    def idle(self) -> bool:
        return not self.parked and not self.done

    # -------------------------------------------------------------------- dead letters

    def _dead_letter(self, message: Message, error: str) -> None:
        """Publish the dead letter; its PUBACK is awaited like any publish of the handler."""
        topic = self.route.dead_letter_topic
        assert topic is not None
        info = None
        if self.link.spec.broker.protocol == 5:
            users = [
                ("original_topic", message.topic),
                ("route", self.route.name),
                ("error", error),
                ("attempt", str(message.attempt)),
            ]
            try:
                info = self.link.publish(
                    topic, message.payload, 1, False, {"user_properties": users}
                )
            except PublishTooLarge as e:
                users.append(("payload_omitted", f"{len(message.payload)} bytes: {e}"))
                try:
                    info = self.link.publish(topic, b"", 1, False, {"user_properties": users})
                except PublishTooLarge as e2:
                    self.log.error("dead_letter_dropped", topic=message.topic, reason=str(e2))
        else:
            envelope = {
                "original_topic": message.topic,
                "route": self.route.name,
                "error": error,
                "attempt": message.attempt,
                "payload_b64": base64.b64encode(message.payload).decode(),
            }
            info = self.link.publish(topic, json.dumps(envelope), 1, False, None)
        if info is not None:
            message.pending.append(info)
