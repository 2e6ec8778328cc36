"""The master with real workers, a real mosquitto and real signals: every message counted by id.

"Lost" means the broker PUBACKed a publish but no handler ever recorded its id in the ledger.
Every wait is bounded; every process is stopped by the PID a helper started or a daemon reported.
Timings are printed, never asserted, except where a bound is the behaviour under test.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import ledger, manifests
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.processes import track_pid
from tests.support.traffic import Publisher, wait_handled

pytestmark = pytest.mark.timeout(120)

DaemonFactory = Callable[..., Daemon]
POLL = 0.005


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.txt"


def publisher(
    publishers: list[Publisher], broker: Broker, topic_for: Callable[[int], str], **kw: Any
) -> Publisher:
    p = Publisher(*broker.address, topic_for=topic_for, **kw)
    publishers.append(p)
    return p


def start(daemon_factory: DaemonFactory, manifest: Path, ledger_path: Path) -> Daemon:
    return daemon_factory(manifest, env={"ROUTEMQD_TEST_LEDGER": str(ledger_path)})


def three_routes() -> list[dict[str, Any]]:
    return [
        manifests.route("alpha", "alpha/{n}", shared=True, workers=3),
        manifests.route("beta", "beta/{n}", shared=True, workers=2),
        manifests.route("gamma", "gamma/{n}"),
    ]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def title(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline()).strip()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ours(ledger_path: Path) -> list[int]:
    """Live processes started with this test's ledger in their environment (master, workers)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("ROUTEMQD_TEST_LEDGER") == str(ledger_path) and alive(p.pid):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def assert_no_orphans(ledger_path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    left = ours(ledger_path)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = ours(ledger_path)
    for pid in left:
        track_pid(pid)  # stopped by the session's safety net
    assert not left, f"processes outlived their master: {[(p, title(p)) for p in left]}"


def pool(status: dict[str, Any], route: str) -> dict[int, int]:
    """index -> pid of one pool's slots."""
    return {s["index"]: s["pid"] for s in status["slots"] if s["route"] == route}


def all_pids(status: dict[str, Any]) -> dict[tuple[str, int], int]:
    return {(s["route"], s["index"]): s["pid"] for s in status["slots"]}


def replaced(old: int) -> Callable[[dict[str, Any]], bool]:
    """The only slot runs a ready worker that is not ``old``, and nothing is being replaced."""

    def check(status: dict[str, Any]) -> bool:
        (slot,) = status["slots"]
        return slot["pid"] not in (None, old) and slot["state"] == "ready" and not slot["replacing"]

    return check


def wall(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[test_master] {text}")


def no_loss(p: Publisher, path: Path, timeout: float = 60) -> set[str]:
    p.stop()
    p.wait_acked(30)
    acked = p.acked
    assert acked, "nothing was acknowledged by the broker"
    missing = wait_handled(path, acked, timeout)
    assert not missing, f"{len(missing)} acknowledged ids never handled: {sorted(missing)[:20]}"
    return acked


# -------------------------------------------------------------------------------------- tests


def test_every_slot_starts_subscribed_under_its_title(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    m = manifests.write(tmp_path / "routemq.yaml", broker.port, three_routes())
    d = start(daemon_factory, m, ledger_path)
    status = d.wait_ready()

    pids = all_pids(status)
    assert sorted(pids) == [
        ("alpha", 0),
        ("alpha", 1),
        ("alpha", 2),
        ("beta", 0),
        ("beta", 1),
        ("gamma", 0),
    ]
    assert len(set(pids.values())) == 6
    assert set(pids.values()) == set(d.children())
    for (route, index), pid in pids.items():
        assert title(pid) == f"routemqd: worker {route}[{index}]"
    assert title(d.pid).startswith("routemqd: master ")
    assert status["daemon"]["ready"] == 6

    routes = ["alpha", "beta", "gamma"]
    p = publisher(publishers, broker, lambda i: f"{routes[i % 3]}/{i}")
    p.publish_many(3 * 60)
    acked = no_loss(p, ledger_path, timeout=30)
    assert len(acked) == 180

    recorded: dict[str, set[int]] = {r: set() for r in routes}
    for entry in ledger.read(ledger_path):
        recorded[entry.topic.split("/")[0]].add(entry.pid)
    for route in routes:
        # each worker of a pool got its share: every one of them is subscribed
        assert recorded[route] == set(pool(status, route).values()), route
    assert all_pids(d.status()) == pids


def test_killed_workers_come_back_in_their_slot_without_loss(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    ledger_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    healthy_after = 0.5
    m = manifests.write(
        tmp_path / "routemq.yaml",
        broker.port,
        [manifests.route("alpha", "alpha/{n}", shared=True, workers=3)],
        supervisor={"healthy_after": healthy_after, "failure_limit": 1000},
    )
    d = start(daemon_factory, m, ledger_path)
    status = d.wait_ready()
    client_ids = {s["index"]: s["client_id"] for s in status["slots"]}
    ready_since = dict.fromkeys(client_ids, time.monotonic())
    p = publisher(publishers, broker, lambda i: f"alpha/{i}")
    p.start(rate=300)
    time.sleep(0.5)

    polled: list[float] = []
    logged: list[float] = []
    for n in range(20):
        index = n % 3
        # a death after a healthy run restarts at once; earlier ones would back off
        wait = ready_since[index] + healthy_after + 0.2 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        old = d.slot("alpha", index)["pid"]
        killed_at_wall = time.time()
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        deadline = killed_at + 10
        while True:
            s = d.slot("alpha", index)
            if s["pid"] not in (None, old) and s["state"] == "ready":
                break
            assert time.monotonic() < deadline, f"slot alpha[{index}] not back: {s}"
            time.sleep(POLL)
        ready_since[index] = time.monotonic()
        polled.append(ready_since[index] - killed_at)
        assert s["client_id"] == client_ids[index]
        assert not alive(old)
        events = [e for e in d.events("worker_ready") if e["pid"] == s["pid"]]
        assert len(events) == 1, events
        logged.append(wall(events[0]) - killed_at_wall)

    acked = no_loss(p, ledger_path)
    dups = ledger.duplicates(ledger_path)
    deaths = d.events("worker_died")
    assert len(deaths) == 20
    assert not d.events("slot_backoff")
    assert not d.events("slot_failed")
    report(
        capsys,
        f"kill->ready over 20 SIGKILLs: log p50 {percentile(logged, 50) * 1000:.1f} ms, "
        f"p99 {percentile(logged, 99) * 1000:.1f} ms; status poll p50 "
        f"{percentile(polled, 50) * 1000:.1f} ms, p99 {percentile(polled, 99) * 1000:.1f} ms; "
        f"{len(acked)} ids acked, 0 lost, {len(dups)} redelivered twice or more",
    )


def test_failing_slots_never_touch_other_pools(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "broken_on_import.py").write_text(
        "raise RuntimeError('this handler module cannot be imported')\n"
        "def handle(message):\n    pass\n"
    )
    m = manifests.write(
        tmp_path / "routemq.yaml",
        broker.port,
        [
            manifests.route("alpha", "alpha/{n}", shared=True, workers=2),
            manifests.route("gamma", "gamma/{n}"),
            manifests.route("broken", "broken/{n}", handler="broken_on_import:handle"),
            # a message that kills its worker is not given up on here: the slot must fail
            manifests.route("crashy", "crashy/{n}", max_attempts=1000),
        ],
        python_path=[str(manifests.REPO_ROOT), str(handlers)],
        supervisor={
            "backoff_initial": 0.2,
            "backoff_max": 5,
            "failure_limit": 5,
            "failure_window": 60,
            "failed_cooldown": 60,
        },
    )
    d = start(daemon_factory, m, ledger_path)

    def settled(s: dict[str, Any]) -> bool:
        states = {(x["route"], x["index"]): x["state"] for x in s["slots"]}
        return states.pop(("broken", 0)) == "failed" and set(states.values()) == {"ready"}

    status = d.wait_for(settled, 30, "broken slot failed, the others ready")
    healthy = {k: v for k, v in all_pids(status).items() if k[0] in ("alpha", "gamma")}
    assert status["daemon"]["failed"] == 1
    failed = [e for e in d.events("slot_failed") if e["pool"] == "broken"]
    assert failed, d.log_tail()
    assert "import" in failed[0]["reason"]

    p = publisher(publishers, broker, lambda i: f"{('alpha', 'gamma')[i % 2]}/{i}")
    p.start(rate=100)
    poison = publisher(
        publishers, broker, lambda i: f"crashy/{i}", payload_for=lambda i: f"poison{i}:exit"
    )
    poison.publish_many(3)
    poison.wait_acked(10)

    d.wait_for(
        lambda s: any(x["route"] == "crashy" and x["state"] == "failed" for x in s["slots"]),
        30,
        "crash-looping slot failed",
    )
    time.sleep(0.5)
    acked = no_loss(p, ledger_path)
    assert len(acked) > 20

    backoffs = [e["delay_s"] for e in d.events("slot_backoff") if e["pool"] == "crashy"]
    assert len(backoffs) >= 2, d.log_tail()
    assert backoffs == sorted(backoffs) and len(set(backoffs)) == len(backoffs), backoffs
    assert [e for e in d.events("slot_failed") if e["pool"] == "crashy"]
    assert not [e for e in d.events("slot_backoff") if e["pool"] != "crashy"]

    final = d.status()
    assert final["daemon"]["failed"] == 2
    assert {k: v for k, v in all_pids(final).items() if k in healthy} == healthy
    handled_by = {e.pid for e in ledger.read(ledger_path) if e.ident.isdigit()}
    assert handled_by <= set(healthy.values())
    assert not [e for e in ledger.read(ledger_path) if e.ident.startswith("poison")]
    assert d.proc.poll() is None


def test_a_stuck_handler_is_killed_and_its_message_redelivered(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    m = manifests.write(
        tmp_path / "routemq.yaml",
        broker.port,
        [
            manifests.route(
                "stuck", "stuck/{n}", handler="tests.handlers.once:record", heartbeat_timeout=2
            )
        ],
        supervisor={"graceful_timeout": 3},
    )
    d = start(daemon_factory, m, ledger_path)
    status = d.wait_ready()
    first = status["slots"][0]
    p = publisher(
        publishers,
        broker,
        lambda i: f"stuck/{i}",
        payload_for=lambda i: f"{i}:block" if i == 0 else str(i),
    )
    p.publish_many(10)

    d.wait_for(replaced(first["pid"]), 30, "stuck worker replaced")
    unhealthy = d.events("worker_unhealthy")
    assert [e["pid"] for e in unhealthy] == [first["pid"]], unhealthy
    assert "stuck" in unhealthy[0]["reason"] or "heartbeat" in unhealthy[0]["reason"]
    stuck = d.events("worker_stuck")
    assert stuck and "once.py" in stuck[0]["stack"], stuck
    no_loss(p, ledger_path, timeout=30)

    replacement = d.status()["slots"][0]
    assert replacement["client_id"] == first["client_id"]
    entries = [e for e in ledger.read(ledger_path) if e.ident == "0"]
    assert len(entries) == 1
    assert entries[0].dup and entries[0].pid == replacement["pid"]


def test_a_frozen_worker_is_killed_and_replaced(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    m = manifests.write(
        tmp_path / "routemq.yaml",
        broker.port,
        [manifests.route("frozen", "frozen/{n}", heartbeat_timeout=2)],
    )
    d = start(daemon_factory, m, ledger_path)
    first = d.wait_ready()["slots"][0]
    p = publisher(publishers, broker, lambda i: f"frozen/{i}")
    os.kill(first["pid"], signal.SIGSTOP)
    p.publish_many(20)
    d.wait_for(replaced(first["pid"]), 30, "frozen worker replaced")
    unhealthy = d.events("worker_unhealthy")
    assert [e["pid"] for e in unhealthy] == [first["pid"]], unhealthy
    assert "heartbeat" in unhealthy[0]["reason"]
    assert not alive(first["pid"])
    no_loss(p, ledger_path, timeout=30)
    assert {e.pid for e in ledger.read(ledger_path)} == {d.status()["slots"][0]["pid"]}


def test_a_worker_over_max_memory_is_recycled_gracefully(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    m = manifests.write(
        tmp_path / "routemq.yaml",
        broker.port,
        [
            manifests.route(
                "hog", "hog/{n}", handler="tests.handlers.ledger:allocate", max_memory="64MiB"
            )
        ],
        supervisor={"recycle_min_lifetime": 0},
    )
    d = start(daemon_factory, m, ledger_path)
    first = d.wait_ready()["slots"][0]
    p = publisher(
        publishers,
        broker,
        lambda i: f"hog/{i}",
        payload_for=lambda i: f"{i}:40" if i in (5, 6) else str(i),
    )
    p.start(rate=100)

    d.wait_for(replaced(first["pid"]), 30, "recycled")
    time.sleep(0.5)
    no_loss(p, ledger_path)
    recycles = d.events("worker_recycle")
    assert recycles and recycles[0]["pid"] == first["pid"], d.log_tail()
    assert "max_memory" in recycles[0]["reason"]
    exits = [e for e in d.events("worker_exited") if e["pid"] == first["pid"]]
    assert exits and exits[0]["exit"] == "ok", d.log_tail()
    assert not d.events("worker_died")
    assert not d.events("worker_killed")


def test_sigterm_under_load_drains_and_a_restart_loses_nothing(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    ledger_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    graceful = 10
    route = manifests.route("load", "load/{n}", shared=True, workers=2)
    m = manifests.write(
        tmp_path / "routemq.yaml",
        broker.port,
        [route],
        supervisor={"graceful_timeout": graceful},
    )
    d = start(daemon_factory, m, ledger_path)
    workers = set(pool(d.wait_ready(), "load").values())
    p = publisher(publishers, broker, lambda i: f"load/{i}")
    p.start(rate=1000)
    time.sleep(2.0)

    sent_at = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.proc.wait(graceful + 15)
    stopped_in = time.monotonic() - sent_at
    assert rc == 0, d.log_tail()
    assert not [pid for pid in workers if alive(pid)]
    assert not d.events("worker_killed"), d.log_tail()
    assert len([e for e in d.events("worker_exited") if e["reason"] == "shutdown"]) == 2
    handled_before = len(ledger.handled_ids(ledger_path))
    time.sleep(1.0)  # the publisher keeps going while nobody consumes
    p.stop()
    p.wait_acked(30)

    again = start(daemon_factory, m, ledger_path)
    again.wait_ready()
    acked = no_loss(p, ledger_path)
    dups = ledger.duplicates(ledger_path)
    window = 2 * (1 + 16)  # pool size x (concurrency + prefetch)
    report(
        capsys,
        f"SIGTERM under load: master exited 0 in {stopped_in:.2f}s; {len(acked)} ids acked "
        f"({handled_before} handled before the stop), 0 lost, {len(dups)} duplicates",
    )
    assert len(dups) <= window, dups


def test_workers_do_not_outlive_a_killed_master(
    broker: Broker,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    m = manifests.write(tmp_path / "routemq.yaml", broker.port, three_routes())
    d = start(daemon_factory, m, ledger_path)
    workers = list(all_pids(d.wait_ready()).values())
    assert all(alive(pid) for pid in workers)
    killed_at = time.monotonic()
    d.kill()
    while any(alive(pid) for pid in workers) and time.monotonic() - killed_at < 2.0:
        time.sleep(0.02)
    survivors = [pid for pid in workers if alive(pid)]
    assert not survivors, f"workers alive 2 s after the master was killed: {survivors}"
    assert_no_orphans(ledger_path)


def test_second_sigterm_hurries_the_drain_and_sigquit_is_immediate(
    broker: Broker,
    daemon_factory: DaemonFactory,
    publishers: list[Publisher],
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    m = manifests.write(
        tmp_path / "routemq.yaml",
        broker.port,
        [manifests.route("slow", "slow/{n}", shared=True, workers=2)],
        supervisor={"graceful_timeout": 30},
    )
    d = start(daemon_factory, m, ledger_path)
    workers = list(pool(d.wait_ready(), "slow").values())
    p = publisher(publishers, broker, lambda i: f"slow/{i}", payload_for=lambda i: f"{i}:sleep=20")
    p.publish_many(2)
    p.wait_acked(10)
    time.sleep(1.0)  # both handlers are asleep now

    d.signal(signal.SIGTERM)
    time.sleep(1.5)
    assert d.proc.poll() is None, "the first SIGTERM must wait for in-flight handlers"
    assert d.events("shutdown_started")
    hurried_at = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.proc.wait(20)
    hurried_in = time.monotonic() - hurried_at
    assert hurried_in < 8, f"second SIGTERM took {hurried_in:.1f}s to end the drain"
    assert rc == 0, d.log_tail()
    assert d.events("shutdown_hurried")
    assert not [pid for pid in workers if alive(pid)]
    assert_no_orphans(ledger_path)

    # the unfinished messages were left in the sessions: the next workers are busy with them
    quick = start(daemon_factory, m, ledger_path)
    workers = list(pool(quick.wait_ready(), "slow").values())
    time.sleep(0.5)
    quit_at = time.monotonic()
    quick.signal(signal.SIGQUIT)
    quick.proc.wait(20)
    assert time.monotonic() - quit_at < 8
    assert quick.events("quick_shutdown")
    assert not [pid for pid in workers if alive(pid)]
    assert_no_orphans(ledger_path)


def _catches_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        pass
    return False


def _has_children(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).children())
    except psutil.Error:
        return False


@pytest.mark.parametrize("moment", ["immediately", "handlers_installed", "first_fork"])
def test_sigterm_during_startup_is_not_lost(
    broker: Broker,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    ledger_path: Path,
    moment: str,
) -> None:
    # Until the interpreter has installed the master's handlers, SIGTERM has the kernel's
    # default action (nothing forked yet, nothing to lose); from then on it must be handled.
    m = manifests.write(tmp_path / "routemq.yaml", broker.port, three_routes())
    d = start(daemon_factory, m, ledger_path)
    ready = {
        "immediately": lambda pid: True,
        "handlers_installed": _catches_sigterm,
        "first_fork": _has_children,
    }[moment]
    deadline = time.monotonic() + 30
    while not ready(d.pid):
        assert d.proc.poll() is None, d.log_tail()
        assert time.monotonic() < deadline, f"{moment} not reached"
        time.sleep(0.001)
    caught = _catches_sigterm(d.pid)
    d.signal(signal.SIGTERM)
    rc = d.proc.wait(30)
    if rc == -signal.SIGTERM and moment == "immediately" and not caught:
        assert not d.events("worker_spawned"), d.log_tail()
        assert_no_orphans(ledger_path)
        return
    assert rc == 0, d.log_tail()
    assert d.events("shutdown_started"), d.log_tail()
    if moment == "handlers_installed":
        assert not d.events("master_ready"), d.log_tail()
    assert_no_orphans(ledger_path)


def test_bad_manifest_and_second_daemon_are_refused(
    broker: Broker,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    ledger_path: Path,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "broker:\n"
        "  host: 127.0.0.1\n"
        f"  port: {broker.port}\n"
        "routes:\n"
        "  - name: a\n"
        "    topic: a/b\n"
        "    handler: tests.handlers.ledger:record\n"
        "    qos: 7\n"
    )
    cmd = [sys.executable, "-m", "routemqd", "run", "-c"]
    res = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 78, res
    assert f"{bad}:8" in res.stderr and "qos" in res.stderr, res.stderr

    m = manifests.write(tmp_path / "routemq.yaml", broker.port, three_routes())
    d = start(daemon_factory, m, ledger_path)
    before = all_pids(d.wait_ready())
    second = subprocess.run(
        [*cmd, str(m)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ROUTEMQD_TEST_LEDGER": str(ledger_path)},
    )
    assert second.returncode == 73, second
    assert "already" in second.stderr or "another" in second.stderr, second.stderr
    after = d.wait_ready()
    assert all_pids(after) == before
    assert d.proc.poll() is None
    assert not d.events("worker_died")
    assert d.stop() == 0
