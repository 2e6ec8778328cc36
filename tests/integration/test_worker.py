"""A worker on its own against a real broker: every message counted by id.

"Lost" means the broker PUBACKed a publish but no handler ever recorded its id in the ledger.
Every wait is bounded; every process is stopped by the PID the test started.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from routemqd import manifest as manifest_mod
from routemqd import plan
from routemqd.exitcodes import ExitCode
from tests.support import ledger, manifests, traffic
from tests.support.broker import Broker
from tests.support.traffic import Publisher, Subscriber, wait_handled
from tests.support.workers import WorkerProc

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    started: list[WorkerProc] = []
    yield started
    for w in started:
        w.close()


def start(
    workers: list[WorkerProc],
    manifest: Path,
    route: str,
    slot: int,
    ledger_path: Path,
    **kw: Any,
) -> WorkerProc:
    w = WorkerProc(manifest, route, slot, env={"ROUTEMQD_TEST_LEDGER": str(ledger_path)}, **kw)
    workers.append(w)
    return w


def publisher(publishers: list[Publisher], broker: Broker, **kw: Any) -> Publisher:
    p = Publisher(*broker.address, **kw)
    publishers.append(p)
    return p


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def wait_quiet(path: Path, quiet: float = 1.0, timeout: float = 10) -> None:
    """Wait until the ledger has not grown for ``quiet`` seconds (at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_size = path.stat().st_size if path.exists() else 0
        if now_size != size:
            size, since = now_size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def client_id_of(manifest: Path, route: str, index: int) -> str:
    return plan.slots_for(manifest_mod.load(manifest))[(route, index)].client_id


def stop_worker(w: WorkerProc, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    w.signal(sig)
    return w.wait(timeout)


def test_shared_pool_handles_every_message(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc]
) -> None:
    m = manifests.write(
        tmp_path / "m.yaml", broker.port, [manifests.route("s", "t/{n}", shared=True, workers=3)]
    )
    led = tmp_path / "ledger"
    pool = [start(workers, m, "s", i, led) for i in range(3)]
    for w in pool:
        w.wait_event("ready")
    pub = Publisher(*broker.address, topic_for=lambda i: f"t/{i % 7}")
    pub.publish_many(2000)
    pub.wait_acked()
    missing = wait_handled(led, pub.acked)
    assert not missing, f"lost {len(missing)} of {len(pub.acked)}"
    pids = {e.pid for e in ledger.read(led)}
    assert len(pids) == 3, "the broker should balance across all three slots"
    pub.close()


# ----------------------------------------------------------------------------- crash and stop


def test_sigkill_mid_handler_redelivers_to_the_next_worker(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    m = manifests.write(tmp_path / "m.yaml", broker.port, [manifests.route("k", "k/{n}")])
    led = tmp_path / "ledger"
    first = start(workers, m, "k", 0, led)
    first.wait_event("ready")
    slow = {5, 6}
    pub = publisher(
        publishers,
        broker,
        topic_for=lambda i: "k/x",
        payload_for=lambda i: f"{i}:sleep=2" if i in slow else str(i),
    )
    pub.publish_many(30)
    pub.wait_acked()
    assert first.wait_heartbeat(lambda hb: hb["busy_for"] > 0.3, timeout=10)
    first.kill()  # SIGKILL mid-sleep; the rest wait unacked in the worker or in the broker
    before = ledger.handled_ids(led)
    interrupted = {str(i) for i in slow} - before
    assert interrupted, "the worker was killed in the middle of a slow message"
    pub.publish_many(20)  # while no process holds the session
    pub.wait_acked()

    second = start(workers, m, "k", 0, led)
    second.wait_event("ready")
    missing = wait_handled(led, pub.acked, timeout=20)
    assert not missing, f"lost {len(missing)} of {len(pub.acked)}: {sorted(missing, key=int)}"
    redone = [e for e in ledger.read(led) if e.ident in interrupted]
    assert [e.pid for e in redone] == [second.pid] * len(interrupted)
    assert all(e.dup for e in redone), "an unacked in-flight message comes back with DUP set"


def test_sigterm_keeps_the_session_for_the_replacement(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    m = manifests.write(tmp_path / "m.yaml", broker.port, [manifests.route("k", "k/{n}")])
    led = tmp_path / "ledger"
    first = start(workers, m, "k", 0, led)
    first.wait_event("ready")
    pub = publisher(publishers, broker, topic_for=lambda i: f"k/{i % 3}")
    pub.start(rate=500)
    time.sleep(1.0)
    assert stop_worker(first) == ExitCode.OK
    down_from = pub.next_id
    time.sleep(1.0)  # traffic keeps coming while the slot has no process
    pub.stop()
    down_until = pub.next_id
    pub.wait_acked()

    second = start(workers, m, "k", 0, led)
    second.wait_event("ready")
    missing = wait_handled(led, pub.acked, timeout=20)
    assert not missing, f"lost {len(missing)} of {len(pub.acked)}"
    by_second = {e.ident for e in ledger.read(led) if e.pid == second.pid}
    assert {str(i) for i in range(down_from, down_until)} <= by_second
    assert down_until - down_from > 200


def test_retire_on_a_shared_slot_hands_over_without_loss(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    m = manifests.write(
        tmp_path / "m.yaml", broker.port, [manifests.route("r", "r/{n}", shared=True, workers=2)]
    )
    led = tmp_path / "ledger"
    leaving, staying = (start(workers, m, "r", i, led) for i in range(2))
    for w in (leaving, staying):
        w.wait_event("ready")
    pub = publisher(publishers, broker, topic_for=lambda i: f"r/{i % 5}")
    began = time.monotonic()
    pub.start(rate=1000)
    time.sleep(1.0)
    assert stop_worker(leaving, signal.SIGUSR2) == ExitCode.OK
    retired_at = pub.next_id
    time.sleep(max(0.5, 3.0 - (time.monotonic() - began)))
    pub.stop()
    pub.wait_acked()

    missing = wait_handled(led, pub.acked, timeout=20)
    assert not missing, f"lost {len(missing)} of {len(pub.acked)}"
    entries = ledger.read(led)
    assert {e.pid for e in entries} == {leaving.pid, staying.pid}
    late = [e for e in entries if int(e.ident) >= retired_at]
    assert late and all(e.pid == staying.pid for e in late), "the other slot takes over"
    assert pub.next_id > 2000
    cid = client_id_of(m, "r", 0)
    assert not traffic.session_present(*broker.address, cid), "a retired slot ends its session"


def test_broker_restart_pool_reconnects_and_resubscribes(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    m = manifests.write(
        tmp_path / "m.yaml", broker.port, [manifests.route("b", "b/{n}", shared=True, workers=2)]
    )
    led = tmp_path / "ledger"
    pool = [start(workers, m, "b", i, led) for i in range(2)]
    for w in pool:
        w.wait_event("ready")
    pub = publisher(publishers, broker, topic_for=lambda i: f"b/{i % 5}")
    pub.start(rate=500)
    time.sleep(1.0)
    broker.restart()
    for w in pool:
        w.wait_heartbeat(lambda hb: hb["connected"], timeout=15)
    time.sleep(1.0)  # SUBACK follows CONNACK within a round trip
    recovered_at = pub.next_id
    time.sleep(1.5)
    pub.stop()
    pub.wait_acked(timeout=30)

    acked = pub.acked
    after = {i for i in acked if int(i) >= recovered_at}
    assert len(after) > 500
    missing_after = wait_handled(led, after, timeout=20)
    assert not missing_after, f"{len(missing_after)} published after recovery never handled"
    wait_quiet(led)
    lost = acked - ledger.handled_ids(led)
    print(f"broker restart: lost {len(lost)} of {len(acked)} PUBACKed ids: {sorted(lost, key=int)}")
    assert {e.pid for e in ledger.read(led) if int(e.ident) >= recovered_at} == {
        w.pid for w in pool
    }, "both slots subscribed again"


def test_dead_letter_while_the_broker_is_down_does_not_stop_the_worker(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    route = manifests.route(
        "p", "p/{n}", handler="tests.handlers.ledger:sleep_then_raise", dead_letter_topic="dlq/p"
    )
    m = manifests.write(tmp_path / "m.yaml", broker.port, [route])
    led = tmp_path / "ledger"
    w = start(workers, m, "p", 0, led)
    w.wait_event("ready")
    first = publisher(
        publishers, broker, topic_for=lambda i: "p/x", payload_for=lambda i: f"{i}:sleep=1.5"
    )
    first.publish_many(1)
    first.wait_acked()
    w.wait_heartbeat(lambda hb: hb["busy_for"] > 0, timeout=5)
    broker.stop()  # the handler fails, and its dead letter is published, while nobody listens
    w.wait_heartbeat(lambda hb: hb["failed"] == 1 and not hb["connected"], timeout=5)
    broker.start()
    dlq = Subscriber(*broker.address, "dlq/p")
    try:
        w.wait_heartbeat(lambda hb: hb["connected"], timeout=10)
        pub = publisher(publishers, broker, topic_for=lambda i: "p/x", start_id=1)
        pub.publish_many(5)
        pub.wait_acked()
        missing = wait_handled(led, pub.acked, timeout=10)
        assert not missing, f"the worker stopped handling: {sorted(missing)}"
        hb = w.wait_heartbeat(lambda hb: hb["failed"] == 2, timeout=5)
        letters = dlq.collect(2, timeout=3)
    finally:
        dlq.close()
    # Unconfirmed, so not acked: the broker redelivers it and it fails (and is dead-lettered)
    # again. paho also sends the first letter once reconnected, unless nobody listened yet.
    assert {m.payload for m in letters} == {b"0:sleep=1.5"}
    attempts = [dict(m.properties.UserProperty)["attempt"] for m in letters]
    assert "2" in attempts, attempts
    hb = w.wait_heartbeat(lambda hb: hb["handled"] == 5, timeout=3)
    assert hb["redelivered"] == 1 and hb["failed"] == 2
    assert stop_worker(w) == ExitCode.OK


# ----------------------------------------------------------------------- handlers misbehaving


@pytest.mark.parametrize("protocol", [5, "3.1.1"], ids=["mqtt5", "mqtt311"])
def test_failing_handler_dead_letters_and_keeps_going(
    broker: Broker,
    tmp_path: Path,
    workers: list[WorkerProc],
    publishers: list[Publisher],
    protocol: int | str,
) -> None:
    route = manifests.route(
        "d",
        "d/{n}",
        handler="tests.handlers.ledger:raise_every_10th",
        dead_letter_topic="dlq/x",
    )
    m = manifests.write(tmp_path / "m.yaml", broker.port, [route], protocol=protocol)
    led = tmp_path / "ledger"
    dlq = Subscriber(*broker.address, "dlq/x")
    try:
        w = start(workers, m, "d", 0, led)
        w.wait_event("ready")
        pub = publisher(publishers, broker, topic_for=lambda i: f"d/{i}", start_id=1)
        pub.publish_many(200)
        pub.wait_acked()
        bad = {str(i) for i in range(10, 201, 10)}
        missing = wait_handled(led, pub.acked - bad, timeout=20)
        assert not missing, f"lost {len(missing)}"
        letters = dlq.collect(len(bad), timeout=10)
        time.sleep(0.3)
        assert dlq.messages.empty(), "only failed messages are dead-lettered"
    finally:
        dlq.close()
    assert not bad & ledger.handled_ids(led)
    seen: set[str] = set()
    for msg in letters:
        if protocol == 5:
            ident = msg.payload.decode()
            props = dict(msg.properties.UserProperty)
            assert props["original_topic"] == f"d/{ident}"
            assert props["error"] == f"ValueError: message {ident} is a multiple of 10"
            assert props["attempt"] == "1"
            seen.add(ident)
        else:
            env = json.loads(msg.payload)
            ident = base64.b64decode(env["payload_b64"]).decode()
            assert env["original_topic"] == f"d/{ident}"
            assert env["error"] == f"ValueError: message {ident} is a multiple of 10"
            assert env["attempt"] == 1
            assert env["route"] == "d"
            seen.add(ident)
    assert seen == bad
    hb = w.wait_heartbeat(lambda hb: hb["handled"] + hb["failed"] >= 200, timeout=5)
    assert (hb["failed"], hb["dead_lettered"], hb["handled"]) == (20, 20, 180)
    assert "multiple of 10" in hb["last_error"]
    assert stop_worker(w) == ExitCode.OK


@pytest.mark.timeout(90)  # a hang guard around a 20 s handler, fixtures included
def test_long_handler_runs_once_despite_short_keepalive(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    m = manifests.write(
        tmp_path / "m.yaml", broker.port, [manifests.route("l", "l/x")], broker={"keepalive": 5}
    )
    led = tmp_path / "ledger"
    w = start(workers, m, "l", 0, led)
    w.wait_event("ready")
    pub = publisher(
        publishers, broker, topic_for=lambda i: "l/x", payload_for=lambda i: f"{i}:sleep=20"
    )
    pub.publish_many(1)
    pub.wait_acked()
    assert not wait_handled(led, {"0"}, timeout=25)
    hb = w.wait_heartbeat(lambda hb: hb["handled"] == 1, timeout=3)
    entries = ledger.read(led)
    assert [(e.ident, e.dup) for e in entries] == [("0", False)]
    assert (hb["received"], hb["redelivered"]) == (1, 0)
    after_ready = w.events[next(i for i, e in enumerate(w.events) if e["t"] == "ready") :]
    beats = [e for e in after_ready if e["t"] == "hb"]
    assert len(beats) >= 18
    assert all(h["connected"] for h in beats), "the broker never timed the worker out"
    assert "exceeded timeout" not in broker.log_tail(200)


def test_non_shared_route_keeps_publish_order(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    m = manifests.write(tmp_path / "m.yaml", broker.port, [manifests.route("o", "o/{n}")])
    led = tmp_path / "ledger"
    w = start(workers, m, "o", 0, led)
    w.wait_event("ready")
    pub = publisher(publishers, broker, topic_for=lambda i: f"o/{i % 4}")
    pub.publish_many(1000)
    pub.wait_acked()
    assert not wait_handled(led, pub.acked, timeout=20)
    assert [e.ident for e in ledger.read(led)] == pub.published


def test_hostile_payloads_never_crash_the_worker(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc]
) -> None:
    route = manifests.route(
        "h", "h/{n}", handler="tests.handlers.ledger:record_json", dead_letter_topic="dlq/h"
    )
    m = manifests.write(tmp_path / "m.yaml", broker.port, [route])
    led = tmp_path / "ledger"
    w = start(workers, m, "h", 0, led)
    w.wait_event("ready")
    dlq = Subscriber(*broker.address, "dlq/h")
    pub = traffic.client(*broker.address)
    pub.connect(*broker.address, 30)
    pub.loop_start()
    big_json = json.dumps({"id": "big", "pad": "x" * 1_000_000}).encode()
    cases: list[tuple[str, bytes, str]] = [
        ("empty", b"", "PayloadError: payload on 'h/empty' is empty, expected JSON"),
        ("big", big_json, ""),
        ("utf8", b"\xc3\x28{\x80}", "PayloadError: payload on 'h/utf8' is not UTF-8 text"),
        ("json", b'{"id": 1,', "PayloadError: payload on 'h/json' is not valid JSON"),
        ("bigbad", b"[" + b"1," * 500_000, "PayloadError: payload on 'h/bigbad' is not valid"),
        ("after", b'{"id": "after"}', ""),
    ]
    try:
        for name, payload, error in cases:
            before = w.heartbeats()[-1]
            info = pub.publish(f"h/{name}", payload, qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
            if error:
                hb = w.wait_heartbeat(lambda hb, b=before: hb["failed"] > b["failed"], 10)
                assert hb["last_error"].startswith(error), hb["last_error"]
                (letter,) = dlq.collect(1, timeout=10)
                assert letter.payload == payload
                props = dict(letter.properties.UserProperty)
                assert props["original_topic"] == f"h/{name}"
                assert props["error"].startswith(error)
            else:
                assert not wait_handled(led, {name}, timeout=10)
    finally:
        pub.disconnect()
        pub.loop_stop()
        dlq.close()
    hb = w.wait_heartbeat(lambda hb: True, timeout=3)
    assert (hb["handled"], hb["failed"], hb["dead_lettered"]) == (2, 4, 4)
    assert w.proc.poll() is None
    assert stop_worker(w) == ExitCode.OK


def test_async_handler_with_concurrency(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    route = manifests.route(
        "a",
        "a/{n}",
        handler="tests.handlers.ledger:record_async_overlap",
        shared=True,
        concurrency=4,
    )
    m = manifests.write(tmp_path / "m.yaml", broker.port, [route])
    led = tmp_path / "ledger"
    w = start(workers, m, "a", 0, led)
    w.wait_event("ready")
    pub = publisher(publishers, broker, topic_for=lambda i: f"a/{i % 9}")
    pub.publish_many(500)
    pub.wait_acked()
    missing = wait_handled(led, pub.acked, timeout=20)
    assert not missing, f"lost {len(missing)} of {len(pub.acked)}"
    entries = ledger.read(led)
    assert len(entries) == 500, ledger.duplicates(led)
    assert max(int(e.tag.removeprefix("peak")) for e in entries) == 4
    assert stop_worker(w) == ExitCode.OK


# ------------------------------------------------------------------------------ boot and stuck


def test_handler_that_does_not_import_is_a_boot_failure(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc]
) -> None:
    (tmp_path / "broken_handlers.py").write_text("raise RuntimeError('missing config at import')\n")
    m = manifests.write(
        tmp_path / "m.yaml",
        broker.port,
        [manifests.route("x", "x/{n}", handler="broken_handlers:handle")],
        python_path=[str(manifests.REPO_ROOT), str(tmp_path)],
    )
    w = start(workers, m, "x", 0, tmp_path / "ledger")
    assert w.wait(15) == ExitCode.HANDLER_IMPORT_FAILED
    w.poll_events()
    kinds = [e["t"] for e in w.events]
    assert kinds == ["boot_error"], w.events
    event = w.events[0]
    assert event["code"] == ExitCode.HANDLER_IMPORT_FAILED
    assert "missing config at import" in event["reason"]
    assert "broken_handlers" in event["reason"]


def test_held_worker_waits_for_connect(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    m = manifests.write(tmp_path / "m.yaml", broker.port, [manifests.route("k", "k/{n}")])
    led = tmp_path / "ledger"
    w = start(workers, m, "k", 0, led, hold=True)
    w.wait_event("warm")
    time.sleep(1.0)
    w.poll_events()
    assert "ready" not in [e["t"] for e in w.events]
    hb = w.wait_heartbeat(lambda hb: True, timeout=3)
    assert not hb["connected"]
    cid = client_id_of(m, "k", 0)
    assert cid not in broker.log_tail(200), "a held worker must not touch its session"

    w.command(cmd="connect")
    w.wait_event("ready", timeout=10)
    pub = publisher(publishers, broker, topic_for=lambda i: "k/x")
    pub.publish_many(10)
    pub.wait_acked()
    assert not wait_handled(led, pub.acked, timeout=10)


def test_stuck_handler_is_reported_with_its_stack(
    broker: Broker, tmp_path: Path, workers: list[WorkerProc], publishers: list[Publisher]
) -> None:
    m = manifests.write(
        tmp_path / "m.yaml",
        broker.port,
        [manifests.route("s", "s/{n}", handler_timeout=1)],
        supervisor={"graceful_timeout": 2},
    )
    w = start(workers, m, "s", 0, tmp_path / "ledger")
    w.wait_event("ready")
    pub = publisher(
        publishers, broker, topic_for=lambda i: "s/slow", payload_for=lambda i: f"{i}:block"
    )
    sent = time.monotonic()
    pub.publish_many(1)
    stuck = w.wait_event("stuck", timeout=4)
    assert time.monotonic() - sent < 3.5
    assert stuck["topic"] == "s/slow"
    assert stuck["busy_for"] > 1
    assert "tests/handlers/ledger.py" in stuck["stack"]
    assert "in _act" in stuck["stack"] and "in record" in stuck["stack"]
    first = w.wait_heartbeat(lambda hb: hb["busy_for"] > 0, timeout=3)
    second = w.wait_heartbeat(lambda hb: True, timeout=3)
    assert second["busy_for"] > first["busy_for"]
    assert second["busy_topic"] == "s/slow"
    assert [e["t"] for e in w.events].count("stuck") == 1, "reported once per message"
    assert stop_worker(w) == ExitCode.OK
