"""Autoscaling soaks for ``make chaos``: the full load-step scenario and a host with busy cores.

- 50 msg/s, a step to 1,200 msg/s for 30 s with a 2 ms handler, then silence, with the default
  cool-down shortened to 10 s: the pool grows until it keeps up, never beyond 4, shrinks back to
  1, 0 lost, no retired slot left with a session.
- A CPU-bound handler while two processes keep both cores busy: the pool does not grow (adding
  workers to saturated cores only adds contention), and loses nothing.

Skipped until the master runs the scaler and reports pool sizes in status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import autoscale
from tests.support.broker import Broker
from tests.support.daemon import Daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_full_load_step_scenario(
    tmp_path: Path, broker: Broker, daemon_factory: Callable[..., Daemon]
) -> None:
    # host_cpu_max 100 %: the host-CPU guard off, so other load on a shared host cannot decide the
    # growth this test is about (the guard has its own test below)
    scaling = {"up_after": "2s", "down_after": "10s", "host_cpu_max": "100%"}
    m = autoscale.write_manifest(tmp_path, broker, scaling=scaling)
    run = autoscale.start(tmp_path, broker, daemon_factory, m)
    try:
        autoscale.require_scaler(run.daemon)
        run.start_polling()
        quiet = run.load(rate=50)
        time.sleep(10)
        assert run.largest() == 1
        step = run.load(rate=1200)
        time.sleep(30)
        step.stop()
        quiet.stop()
        grown = run.largest()
        assert 2 <= grown <= 4, run.sizes
        acked, missing = run.finish(240)
        run.wait_size(1, 120, "shrunk back to 1")
        print(f"\nautoscale: grew to {grown}, {len(acked)} acked, {len(missing)} lost")
        assert not missing, f"{len(missing)} of {len(acked)} lost: {sorted(missing)[:10]}"
        run.assert_retired(m, kept=1, most=grown)
    finally:
        run.close()


def test_cpu_bound_handler_on_a_busy_host_does_not_grow(
    tmp_path: Path, broker: Broker, daemon_factory: Callable[..., Daemon]
) -> None:
    m = autoscale.write_manifest(tmp_path, broker, scaling={"up_after": "1s", "down_after": "5s"})
    run = autoscale.start(tmp_path, broker, daemon_factory, m)
    burners = autoscale.Burners(2)
    try:
        autoscale.require_scaler(run.daemon)
        time.sleep(2)  # let the host's CPU reading see the burners
        run.start_polling()
        run.load(rate=400, payload="burn=0.005")  # 2 cores' worth of CPU, on busy cores
        time.sleep(20)
        grown = run.largest()
        burners.close()
        acked, missing = run.finish(240)
        print(f"\nbusy host: largest pool {grown}, {len(acked)} acked, {len(missing)} lost")
        assert grown <= 2, run.sizes
        assert not missing, f"{len(missing)} of {len(acked)} lost"
    finally:
        burners.close()
        run.close()
