"""The master's memory and file descriptors stay flat over many worker restarts.

Every restart forks a worker and opens two pipes, a psutil handle and a shared-memory board for
it; every exit must give all of that back. Workers are SIGKILLed in a loop (the restart policy is
set to restart at once, so the loop is not slowed by backoff) and restarted with the ``restart``
control command (rolling replacement keeping the session); the master's RSS and open file
descriptors are compared before and after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import manifests
from tests.support.broker import Broker
from tests.support.daemon import Daemon

pytestmark = pytest.mark.timeout(600)

MiB = 1024 * 1024
FD_GROWTH_LIMIT = 5
RSS_GROWTH_LIMIT = 20 * MiB
WARM_UP = 20
POOL = 4

DaemonFactory = Callable[..., Daemon]


@dataclass(frozen=True)
class Usage:
    rss: int
    fds: int
    children: int
    zombies: int


def usage(pid: int) -> Usage:
    proc = psutil.Process(pid)
    kids = proc.children()
    zombies = 0
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            zombies += kid.status() == psutil.STATUS_ZOMBIE
    return Usage(
        rss=proc.memory_info().rss,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        children=len(kids),
        zombies=zombies,
    )


def start(broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory) -> Daemon:
    m = manifests.write(
        tmp_path / "routemq.yaml",
        broker.port,
        [manifests.route("churn", "churn/{n}", shared=True, workers=POOL)],
        supervisor={
            "backoff_initial": "10ms",
            "backoff_max": "50ms",
            "failure_limit": 1000,
            "failure_window": "100ms",
            "healthy_after": 0,
            "failed_cooldown": "100ms",
            "health_interval": "200ms",
        },
        host_id=f"churn-{tmp_path.name[-12:].strip('-_.') or 'x'}",
    )
    daemon = daemon_factory(m, env={"ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger")})
    daemon.wait_ready()
    return daemon


def ready_pids(status: dict[str, Any]) -> dict[int, int] | None:
    """slot index -> pid when every slot is ready with a worker, else None."""
    slots = status["slots"]
    if len(slots) != POOL or any(s["state"] != "ready" or not s["pid"] for s in slots):
        return None
    return {s["index"]: s["pid"] for s in slots}


def wait_all_replaced(daemon: Daemon, old: dict[int, int], timeout: float = 30) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = ready_pids(daemon.status())
        if pids is not None and all(pids[i] != old[i] for i in old):
            return pids
        time.sleep(0.005)
    raise AssertionError(f"workers not replaced within {timeout}s:\n{daemon.log_tail()}")


def kill_all(daemon: Daemon, pids: dict[int, int]) -> None:
    for pid in pids.values():
        # only our daemon's own children, by PID
        assert psutil.Process(pid).ppid() == daemon.pid
        os.kill(pid, signal.SIGKILL)


def settled(daemon: Daemon, timeout: float = 10) -> Usage:
    """The master's usage once every exit is reaped (and so logged): exactly POOL children and
    no zombie. Measuring earlier counts a dead worker that is still on its way out."""
    deadline = time.monotonic() + timeout
    while True:
        now = usage(daemon.pid)
        if (now.children == POOL and now.zombies == 0) or time.monotonic() >= deadline:
            return now
        time.sleep(0.05)


def churn_by_sigkill(daemon: Daemon, restarts: int) -> float:
    started = time.monotonic()
    pids = ready_pids(daemon.status())
    assert pids is not None
    for _ in range(restarts // POOL):
        kill_all(daemon, pids)
        pids = wait_all_replaced(daemon, pids)
    return time.monotonic() - started


def report(label: str, restarts: int, seconds: float, before: Usage, after: Usage) -> None:
    print(
        f"\n{label}: {restarts} restarts in {seconds:.1f}s; master rss {before.rss / MiB:.1f} -> "
        f"{after.rss / MiB:.1f} MiB ({(after.rss - before.rss) / MiB:+.1f}), fds {before.fds} -> "
        f"{after.fds} ({after.fds - before.fds:+d}), children {after.children}, "
        f"zombies {after.zombies}"
    )


def check_flat(before: Usage, after: Usage) -> None:
    assert after.fds - before.fds <= FD_GROWTH_LIMIT
    assert after.rss - before.rss <= RSS_GROWTH_LIMIT
    assert after.children == POOL
    assert after.zombies == 0


def sigkill_churn(
    broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory, restarts: int
) -> None:
    daemon = start(broker, tmp_path, daemon_factory)
    churn_by_sigkill(daemon, WARM_UP)  # imports, caches and allocator pools settle first
    before = usage(daemon.pid)
    seconds = churn_by_sigkill(daemon, restarts)
    after = settled(daemon)
    report("SIGKILL churn", restarts, seconds, before, after)
    check_flat(before, after)
    status = daemon.status()
    total = sum(s["restarts"] for s in status["slots"])
    assert total >= WARM_UP + restarts
    assert status["daemon"]["failed"] == 0
    assert len(daemon.events("worker_died")) >= WARM_UP + restarts
    assert daemon.stop() == 0


def test_master_stays_flat_over_200_worker_kills(
    broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    sigkill_churn(broker, tmp_path, daemon_factory, 200)


@pytest.mark.slow
def test_master_stays_flat_over_1000_worker_kills(
    broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    sigkill_churn(broker, tmp_path, daemon_factory, 1000)


def test_master_stays_flat_over_rolling_restarts(
    broker: Broker, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """``routemqd restart``: a warmed replacement per slot, holding until the old one lets go."""
    daemon = start(broker, tmp_path, daemon_factory)

    def rounds(n: int) -> float:
        started = time.monotonic()
        pids = ready_pids(daemon.status())
        assert pids is not None
        for _ in range(n):
            assert daemon.control(cmd="restart")["ok"]
            pids = wait_all_replaced(daemon, pids, timeout=60)
        return time.monotonic() - started

    rounds(3)
    before = usage(daemon.pid)
    n = 10
    seconds = rounds(n)
    after = settled(daemon)
    report("rolling restarts", n * POOL, seconds, before, after)
    check_flat(before, after)
    assert daemon.events("worker_died") == []  # every replacement was a clean hand-over
    assert len(daemon.events("worker_replace")) >= (3 + n) * POOL
    assert daemon.stop() == 0
