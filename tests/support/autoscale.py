"""An autoscaled pool under a load step, against a real daemon and broker, every id counted.

Shared by the short scenario in ``make test`` (tests/integration/test_autoscale.py) and the full
one in ``make chaos`` (tests/chaos/test_autoscale.py). ``Run`` polls ``routemqd status`` for the
pool's size while the load runs, so a test can assert how it grew and shrank; ``assert_retired``
checks that every slot the scaler removed left no session (and so no subscription) behind.

The scenario needs the master to run the scaler and report each pool's min, max, desired and
actual size in status (``pools``); ``require_scaler`` skips the test until it does.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from routemqd.manifest import load
from routemqd.plan import client_id
from tests.support import ledger, manifests
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.processes import stop_pid, track_pid
from tests.support.traffic import Publisher, session_present, wait_handled

POOL = "auto"
TOPIC = "auto/{n}"


def write_manifest(
    tmp: Path,
    broker: Broker,
    *,
    lo: int = 1,
    hi: int = 4,
    scaling: dict[str, Any] | None = None,
) -> Path:
    r = manifests.route(
        POOL,
        TOPIC,
        "tests.handlers.ledger:record",
        shared=True,
        workers={"min": lo, "max": hi},
        scaling=scaling or {"up_after": "1s", "down_after": "3s"},
    )
    return manifests.write(tmp / "routemq.yaml", broker.port, [r])


def pool_of(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((p for p in status.get("pools") or () if p.get("route") == POOL), None)


def require_scaler(d: Daemon) -> None:
    pool = pool_of(d.status())
    if pool is None or not {"min", "max", "desired", "actual"} <= set(pool):
        pytest.skip("the master does not report pool min/max/desired/actual: scaler not wired")


@dataclass
class Run:
    """One daemon with an autoscaled pool, its publishers and a status poller."""

    tmp: Path
    broker: Broker
    daemon: Daemon
    publishers: list[Publisher] = field(default_factory=list)
    sizes: list[tuple[float, int, int]] = field(default_factory=list)  # (t, desired, actual)
    _stop: threading.Event = field(default_factory=threading.Event)
    _poller: threading.Thread | None = None

    @property
    def ledger_path(self) -> Path:
        return self.tmp / "ledger"

    def start_polling(self, every: float = 0.2) -> None:
        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    pool = pool_of(self.daemon.status())
                except OSError:
                    continue
                if pool is not None:
                    self.sizes.append((time.monotonic(), pool["desired"], pool["actual"]))

        self._poller = threading.Thread(target=loop, daemon=True)
        self._poller.start()

    def load(self, rate: float, payload: str = "sleep=0.002") -> Publisher:
        start = 10_000_000 * (len(self.publishers) + 1)
        p = Publisher(
            *self.broker.address,
            topic_for=lambda i: f"auto/{i % 7}",
            payload_for=lambda i: f"{i}:{payload}",
            start_id=start,
        )
        self.publishers.append(p)
        p.start(rate)
        return p

    def size(self) -> tuple[int, int]:
        pool = pool_of(self.daemon.status())
        assert pool is not None
        return pool["desired"], pool["actual"]

    def wait_size(self, actual: int, timeout: float, what: str) -> None:
        """The pool has ``actual`` workers, wants as many, and every slot it removed has left
        the table. A retiring slot no longer counts as actual, but it still drains and holds its
        session until it exits: checking for its session before then would find it (and a
        connection under its client id would take the session over from the draining worker)."""

        def done(s: dict[str, Any]) -> bool:
            p = pool_of(s)
            retiring = [x for x in s["slots"] if x["route"] == POOL and x["state"] == "retiring"]
            return p is not None and p["actual"] == actual == p["desired"] and not retiring

        self.daemon.wait_for(done, timeout, what)

    def largest(self) -> int:
        return max((max(d, a) for _, d, a in self.sizes), default=0)

    def finish(self, timeout: float = 120) -> tuple[set[str], set[str]]:
        """Stop the load, wait for every acknowledged id; (acked, missing)."""
        acked: set[str] = set()
        for p in self.publishers:
            p.stop()
            p.wait_acked(30)
            acked |= p.acked
        missing = wait_handled(self.ledger_path, acked, timeout)
        return acked, missing

    def assert_retired(self, manifest: Path, kept: int, most: int) -> None:
        """Every index from ``kept`` up to ``most`` left no session (so no subscription)."""
        m = load(manifest)
        for index in range(kept, most):
            cid = client_id(m, m.route(POOL), index)
            assert not session_present(*self.broker.address, cid), f"{cid} left a session"

    def assert_only_slots_handle(self, pids: set[int], n: int = 200) -> None:
        """After shrinking, new messages reach only the slots that remain."""
        before = {e.ident for e in ledger.read(self.ledger_path)}
        p = self.load(rate=200, payload="sleep=0")
        time.sleep(n / 200)
        _, missing = self.finish(60)
        assert not missing
        fresh = [e for e in ledger.read(self.ledger_path) if e.ident not in before]
        assert {e.pid for e in fresh if e.ident in p.acked} <= pids

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(5)
        for p in self.publishers:
            p.close()


def start(tmp: Path, broker: Broker, daemon_factory: Callable[..., Daemon], manifest: Path) -> Run:
    d = daemon_factory(
        manifest,
        env={"ROUTEMQD_TEST_LEDGER": str(tmp / "ledger"), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    d.wait_ready(60)
    return Run(tmp, broker, d)


class Burners:
    """Processes that keep every core busy, tracked and stopped by PID."""

    def __init__(self, n: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        for _ in range(n):
            proc = subprocess.Popen(
                [sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL
            )
            track_pid(proc.pid)
            self.procs.append(proc)

    def close(self) -> None:
        while self.procs:
            proc = self.procs.pop()
            stop_pid(proc.pid)
            proc.wait(10)
