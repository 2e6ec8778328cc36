"""With every limit at its default, a message that kills its worker is given up, never the slot.

``max_attempts`` (5) equals ``failure_limit`` (5 in 60 s): if deaths caused by a message counted
towards the slot's failure window, the slot would be parked in ``failed`` for the whole cool-down
before the sixth worker could dead-letter the message. A death with a known message in flight is
the message's fault, so the slot restarts at once and the route goes on.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_poison import _collect
from tests.support import ledger, manifests
from tests.support.broker import Broker
from tests.support.traffic import Publisher, wait_handled

AFTER = 30  # ordinary messages published after the poison one
MAX_ATTEMPTS = 5  # the default
STUCK_AFTER = 1.0  # handler_timeout: what a hang costs per attempt
# Silence from a healthy worker this long would mean a frozen process: far above STUCK_AFTER, so
# that only the hung handler is killed, never a healthy worker that a loaded host delayed.
HEARTBEAT_TIMEOUT = 10.0


@pytest.mark.parametrize("kind", ["crash", "hang"])
@pytest.mark.parametrize("shared", [False, True], ids=["ordered", "shared"])
@pytest.mark.parametrize("dead_letter", [True, False], ids=["dlq", "no-dlq"])
def test_poison_message_is_given_up_with_default_limits(
    broker: Broker,
    tmp_path: Path,
    daemon_factory: Callable[..., Any],
    kind: str,
    shared: bool,
    dead_letter: bool,
) -> None:
    extra: dict[str, Any] = {"shared": True, "workers": 2} if shared else {"shared": False}
    if dead_letter:
        extra["dead_letter_topic"] = "dlq/p"
    if kind == "hang":
        extra["handler_timeout"] = STUCK_AFTER
        extra["heartbeat_timeout"] = HEARTBEAT_TIMEOUT
    # the real cool-down and healthy_after, not the test helper's short ones: a parked slot
    # shows as a timeout, and a stuck worker does not live long enough to count as healthy
    m = manifests.write(
        tmp_path / "m.yaml",
        broker.port,
        [manifests.route("p", "p/{n}", **extra)],
        supervisor={"failed_cooldown": 60, "healthy_after": 10},
    )
    led = tmp_path / "ledger"
    daemon = daemon_factory(m, env={"ROUTEMQD_TEST_LEDGER": str(led)})
    daemon.wait_ready()
    dlq, dead = _collect(broker, "dlq/p") if dead_letter else (None, [])
    poison = "exit" if kind == "crash" else "block"
    pub = Publisher(
        *broker.address,
        topic_for=lambda i: f"p/{i}",
        payload_for=lambda i: f"{i}:{poison}" if i == 0 else str(i),
    )
    started = time.monotonic()
    pub.publish_many(AFTER + 1)
    pub.wait_acked()
    # crash: seconds; hang: one handler_timeout (plus the health check and a restart) an attempt
    bound = 30.0 if kind == "crash" else MAX_ATTEMPTS * (STUCK_AFTER + 3.0) + 20.0
    missing = wait_handled(led, {str(i) for i in range(1, AFTER + 1)}, timeout=bound)
    assert not missing, f"{len(missing)} of {AFTER} later messages not handled: {daemon.log_tail()}"
    gave_up = daemon.wait_for(
        lambda s: bool(daemon.events("poison_message")), timeout=bound, what="poison_message"
    )
    assert gave_up
    elapsed = time.monotonic() - started
    assert elapsed < bound
    print(f"\n{kind} {'shared' if shared else 'ordered'}: poison given up after {elapsed:.1f}s")
    assert "0" not in ledger.handled_ids(led)
    attempts = [e["attempts"] for e in daemon.events("message_attempt_failed")]
    assert attempts == list(range(1, MAX_ATTEMPTS + 1))
    (event,) = daemon.events("poison_message")
    assert event["action"] == ("dead-lettered" if dead_letter else "dropped")
    assert not daemon.events("slot_failed"), "a poison message parked its slot"
    assert not daemon.events("slot_backoff"), "a poison message's deaths backed the slot off"
    if dead_letter:
        daemon.wait_for(lambda s: len(dead) >= 1, timeout=10, what="dead letter")
        assert dead[0].payload == f"0:{poison}".encode()
        assert f"took down {MAX_ATTEMPTS} workers" in dict(dead[0].properties.UserProperty)["error"]
    if kind == "hang":
        killed = daemon.events("worker_unhealthy")
        assert len(killed) == MAX_ATTEMPTS
        # a stuck handler cannot drain: the master kills it at once, without a SIGTERM grace
        assert not daemon.events("worker_killed")
    assert all(s["state"] == "ready" for s in daemon.status()["slots"])
    if dlq is not None:
        dlq.disconnect()
        dlq.loop_stop()
    pub.close()


def test_a_slot_that_dies_with_nothing_in_flight_still_parks(
    broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any]
) -> None:
    """Crashes in idle (nothing on the in-flight board) are the slot's: backoff, then failed."""
    m = manifests.write(
        tmp_path / "m.yaml",
        broker.port,
        [manifests.route("idle", "idle/{n}", shared=False)],
        supervisor={"failed_cooldown": 60, "healthy_after": 30},
    )
    daemon = daemon_factory(m)
    daemon.wait_ready()
    for _ in range(5):
        pid = daemon.slot("idle", 0)["pid"]
        daemon.children()
        os.kill(pid, signal.SIGKILL)
        daemon.wait_for(
            lambda s, pid=pid: (
                s["slots"][0]["pid"] not in (pid,) and s["slots"][0]["state"] in ("ready", "failed")
            ),
            timeout=30,
            what="slot restarted or parked",
        )
        if daemon.slot("idle", 0)["state"] == "failed":
            break
    assert daemon.slot("idle", 0)["state"] == "failed"
    assert len(daemon.events("slot_failed")) == 1
    assert daemon.events("slot_backoff")
    assert not daemon.events("message_attempt_failed")
