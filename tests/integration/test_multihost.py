"""Two routemqd hosts with the same manifest in one shared group, against one broker.

Each host gets its own host id, so their client ids never collide, and the broker balances the
shared routes across all of their workers. A host can leave in three ways and nothing is lost:
a retiring stop (its slots leave the groups), a keeping stop followed by its return (its
sessions queued its share meanwhile), or a hard kill followed by ``retire-host`` on a survivor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from routemqd.manifest import load
from routemqd.plan import slots_for
from tests.support import ledger, manifests
from tests.support.broker import Broker
from tests.support.traffic import Publisher, client, wait_handled

RATE = 500


def _hosts(tmp_path: Path, broker: Broker, **route_kw: Any) -> tuple[Path, Path]:
    paths = []
    for host in ("host-a", "host-b"):
        d = tmp_path / host
        d.mkdir()
        paths.append(
            manifests.write(
                d / "routemq.yaml",
                broker.port,
                [manifests.route("work", "jobs/{n}", shared=True, workers=2, **route_kw)],
                host_id=host,
            )
        )
    return paths[0], paths[1]


def _session_present(broker: Broker, client_id: str) -> bool:
    seen: dict[str, bool] = {}
    done = threading.Event()
    c = client(*broker.address, client_id=client_id)

    def on_connect(_c: Any, _u: Any, flags: Any, _rc: Any, _p: Any) -> None:
        seen["present"] = bool(flags.session_present)
        done.set()

    c.on_connect = on_connect
    c.connect(*broker.address, 30, clean_start=False)
    c.loop_start()
    assert done.wait(10)
    c.disconnect()
    c.loop_stop()
    return seen["present"]


def _pids_by_host(led: Path, daemons: dict[str, Any]) -> dict[str, int]:
    counts = dict.fromkeys(daemons, 0)
    owner = {pid: host for host, d in daemons.items() for pid in d.worker_pids}
    for e in ledger.read(led):
        if e.pid in owner:
            counts[owner[e.pid]] += 1
    return counts


def test_two_hosts_share_the_load_and_a_retiring_stop_loses_nothing(
    broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any]
) -> None:
    ma, mb = _hosts(tmp_path, broker)
    led = tmp_path / "ledger"
    env = {"ROUTEMQD_TEST_LEDGER": str(led)}
    a, b = daemon_factory(ma, env=env), daemon_factory(mb, env=env)
    a.wait_ready()
    b.wait_ready()
    ids_a = {s.client_id for s in slots_for(load(ma)).values()}
    ids_b = {s.client_id for s in slots_for(load(mb)).values()}
    assert not ids_a & ids_b, "two hosts must never share a client id"

    pub = Publisher(*broker.address, topic_for=lambda i: f"jobs/{i}")
    pub.start(RATE)
    time.sleep(2)
    counts = _pids_by_host(led, {"a": a, "b": b})
    assert counts["a"] > 0 and counts["b"] > 0, f"both hosts handle traffic: {counts}"

    out = subprocess.run(
        [sys.executable, "-m", "routemqd", "stop", "--retire", "--socket", b.socket],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert b.proc.wait(30) == 0
    time.sleep(1.5)
    pub.stop()
    pub.wait_acked()
    missing = wait_handled(led, pub.acked, timeout=30)
    assert not missing, f"lost {len(missing)} of {len(pub.acked)} across host-b leaving"
    for cid in ids_b:
        assert not _session_present(broker, cid), f"{cid} left a session behind"
    print(
        f"\nhandled by host: {_pids_by_host(led, {'a': a, 'b': b})}, "
        f"published {len(pub.acked)}, duplicates {len(ledger.duplicates(led))}"
    )
    pub.close()


def test_a_host_that_stops_keeping_sessions_gets_its_share_when_it_returns(
    broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any]
) -> None:
    ma, mb = _hosts(tmp_path, broker)
    led = tmp_path / "ledger"
    env = {"ROUTEMQD_TEST_LEDGER": str(led)}
    a, b = daemon_factory(ma, env=env), daemon_factory(mb, env=env)
    a.wait_ready()
    b.wait_ready()
    pub = Publisher(*broker.address, topic_for=lambda i: f"jobs/{i}")
    pub.start(RATE)
    time.sleep(1)
    assert b.stop() == 0  # SIGTERM: the default stop keeps the sessions
    time.sleep(1.5)  # host-b's sessions keep receiving their share meanwhile
    b2 = daemon_factory(mb, env=env)
    b2.wait_ready()
    time.sleep(1)
    pub.stop()
    pub.wait_acked()
    missing = wait_handled(led, pub.acked, timeout=30)
    assert not missing, f"lost {len(missing)} of {len(pub.acked)}"
    pub.close()


def test_a_killed_host_is_retired_from_a_survivor(
    broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any]
) -> None:
    ma, mb = _hosts(tmp_path, broker)
    led = tmp_path / "ledger"
    env = {"ROUTEMQD_TEST_LEDGER": str(led)}
    a, b = daemon_factory(ma, env=env), daemon_factory(mb, env=env)
    a.wait_ready()
    b.wait_ready()
    pub = Publisher(*broker.address, topic_for=lambda i: f"jobs/{i}")
    pub.start(RATE)
    time.sleep(1)
    # the whole host dies at once: master and workers
    victims = [b.pid, *b.children()]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    b.proc.wait(10)
    psutil.wait_procs([p for p in (_proc(pid) for pid in victims) if p], timeout=5)
    time.sleep(1.5)  # host-b's dead sessions keep collecting their share
    pub.stop()
    pub.wait_acked()
    # A survivor with the same manifest takes over host-b's sessions and ends them.
    out = subprocess.run(
        [sys.executable, "-m", "routemqd", "retire-host", "host-b", "-c", str(ma)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    missing = wait_handled(led, pub.acked, timeout=30)
    assert not missing, f"lost {len(missing)} of {len(pub.acked)}"
    for s in slots_for(load(mb)).values():
        assert not _session_present(broker, s.client_id)
    pub.close()


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None
