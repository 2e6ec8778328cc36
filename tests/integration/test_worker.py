"""A worker on its own against a real broker: every message id counted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ledger, manifests
from tests.support.broker import Broker
from tests.support.traffic import Publisher, wait_handled
from tests.support.workers import WorkerProc


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
    **kw: object,
) -> WorkerProc:
    w = WorkerProc(manifest, route, slot, env={"ROUTEMQD_TEST_LEDGER": str(ledger_path)}, **kw)
    workers.append(w)
    return w


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
