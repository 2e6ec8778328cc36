"""MQTT → PostgreSQL under chaos: rows = distinct reading ids published and PUBACKed, 0 missing,
0 duplicate rows, while workers are SIGKILLed (also between the commit and the acknowledgement,
by tests/chaos/pg_crash.py), the pool is reloaded (scaled, its hooks changed) and restarted.

Runs the shipped example (examples/postgres_sink) against a private PostgreSQL and broker. The
short run is part of ``make test``; ``make chaos`` runs 60 s (``PG_CHAOS_SECONDS`` overrides).
No broker restarts here: Mosquitto 2.0.11 loses what arrives before ``$share`` re-subscribes
(see the chaos soak), which says nothing about the database side.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chaos.pg_crash import chosen
from tests.support import manifests
from tests.support.broker import Broker
from tests.support.traffic import Publisher

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "examples" / "postgres_sink"
RATE = 500.0


@dataclass
class PgReport:
    seconds: float
    published: int = 0
    acked: int = 0
    rows: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicate_rows: int = 0
    crashes_after_commit: int = 0
    crash_mismatch: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)

    def render(self) -> str:
        return "\n".join(
            [
                f"postgres chaos: {self.seconds:.0f}s at {RATE:.0f} msg/s QoS 1",
                f"  faults            {self.faults}",
                f"  crashes after commit, before ack  {self.crashes_after_commit}",
                f"  published {self.published}, acked by broker {self.acked}, rows {self.rows}",
                f"  MISSING {len(self.missing)} {self.missing[:10]}",
                f"  duplicate rows {self.duplicate_rows}, rows never acked {len(self.unexpected)}",
            ]
        )


def _manifest(path: Path, port: int, workers: int, variant: int) -> None:
    middleware = ["tests.chaos.pg_crash:exit_after_commit"]
    if variant % 2:
        middleware.append("sink:slow_log")  # a hook change: the pool is replaced
    manifests.write(
        path,
        port,
        [
            manifests.route(
                "readings",
                "sensors/{device_id}/readings",
                handler="sink:handle",
                setup="sink:setup",
                teardown="sink:teardown",
                middleware=middleware,
                shared=True,
                workers=workers,
                qos=1,
                heartbeat_timeout=5,
                max_attempts=20,  # the crashes are ours, not poison messages
                dead_letter_topic="chaos/pg-dead",
            )
        ],
        python_path=[str(REPO), str(EXAMPLE_DIR)],
        supervisor={
            "graceful_timeout": 10,
            "health_interval": 0.5,
            "healthy_after": 2,
            "failure_limit": 50,
            "failed_cooldown": 2,
            "backoff_max": 1,
        },
    )


def run_pg_chaos(
    tmp: Path, broker: Broker, daemon_factory: Callable[..., Any], dsn: str, seconds: float
) -> PgReport:
    rng = random.Random()
    crash_dir = tmp / "crashed"
    crash_dir.mkdir()
    manifest = tmp / "routemq.yaml"
    workers, variant = 3, 0
    _manifest(manifest, broker.port, workers, variant)
    daemon = daemon_factory(
        manifest, env={"ROUTEMQ_SINK_DSN": dsn, "ROUTEMQ_CHAOS_CRASH_DIR": str(crash_dir)}
    )
    daemon.wait_ready(timeout=60)
    pub = Publisher(
        *broker.address,
        topic_for=lambda i: f"sensors/d{i % 20}/readings",
        payload_for=lambda i: json.dumps({"id": f"r{i}", "value": i}),
    )
    report = PgReport(seconds=seconds)
    faults: dict[str, int] = {}
    pub.start(RATE)
    end = time.monotonic() + seconds
    opening = ["kill", "reload-hooks", "kill", "restart", "reload-scale", "kill"]
    try:
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.6, 1.4))
            kind = (
                opening.pop(0)
                if opening
                else rng.choice(["kill", "kill", "kill", "reload-hooks", "reload-scale", "restart"])
            )
            if kind == "kill":
                live = [s for s in daemon.status()["slots"] if s["pid"] and s["state"] == "ready"]
                if not live:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(live)["pid"], signal.SIGKILL)
            elif kind == "restart":
                daemon.control(cmd="restart", routes=["readings"])
            else:
                if kind == "reload-scale":
                    workers = 2 if workers == 3 else 3
                else:
                    variant += 1
                _manifest(manifest, broker.port, workers, variant)
                daemon.signal(signal.SIGHUP)
            faults[kind] = faults.get(kind, 0) + 1
    finally:
        pub.stop()
    pub.wait_acked(60)
    daemon.wait_ready(timeout=90)
    acked = {f"r{ident}" for ident in pub.acked}
    deadline = time.monotonic() + 90
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            rows = [r[0] for r in conn.execute("SELECT id FROM readings").fetchall()]
            if acked <= set(rows) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        distinct = conn.execute("SELECT count(DISTINCT id) FROM readings").fetchone()
    report.published = len(pub.published)
    report.acked = len(acked)
    report.rows = len(rows)
    report.missing = sorted(acked - set(rows))
    report.unexpected = sorted(set(rows) - {f"r{i}" for i in pub.published})
    report.duplicate_rows = len(rows) - (distinct[0] if distinct else 0)
    crashed = {p.name for p in crash_dir.iterdir()}
    report.crashes_after_commit = len(crashed)
    # each chosen reading killed its worker exactly once, after its row was committed
    report.crash_mismatch = sorted(crashed ^ {r for r in rows if chosen(int(r[1:]))})
    report.faults = faults
    pub.close()
    return report


def _check(report: PgReport) -> None:
    assert report.acked > 0.9 * report.published, report.render()
    assert not report.missing, report.render()
    assert report.duplicate_rows == 0, report.render()
    assert not report.unexpected, report.render()
    assert report.crashes_after_commit > 0, report.render()
    assert not report.crash_mismatch, report.crash_mismatch


def test_postgres_exactly_once_short(
    broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any], postgres_dsn: str
) -> None:
    report = run_pg_chaos(tmp_path, broker, daemon_factory, postgres_dsn, seconds=12)
    print("\n" + report.render())
    assert sum(report.faults.values()) >= 6, report.faults
    _check(report)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_postgres_exactly_once_soak(
    broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any], postgres_dsn: str
) -> None:
    seconds = float(os.environ.get("PG_CHAOS_SECONDS", "60"))
    report = run_pg_chaos(tmp_path, broker, daemon_factory, postgres_dsn, seconds=seconds)
    print("\n" + report.render())
    assert set(report.faults) >= {"kill", "restart", "reload-hooks", "reload-scale"}
    _check(report)
