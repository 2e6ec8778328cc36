"""Chaos under load: nothing the broker acknowledged may be lost by routemqd.

The short run is part of ``make test``; ``make chaos`` runs the soak (5 minutes at 500 msg/s by
default; ``CHAOS_SECONDS`` and ``CHAOS_RATE`` override).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.soak import run_soak
from tests.support.broker import Broker


def test_chaos_short(broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any]) -> None:
    report = run_soak(
        tmp_path, broker, daemon_factory, seconds=20, rate=300, fault_every=(0.7, 1.5)
    )
    print("\n" + report.render())
    assert report.fault_total >= 8
    assert {"kill", "stop", "broker", "reload-scale", "reload-handler", "reload-topic"} <= set(
        report.faults
    ), report.faults
    assert report.acked > 0.9 * report.published
    assert not report.lost_ours, report.render()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chaos_soak(broker: Broker, tmp_path: Path, daemon_factory: Callable[..., Any]) -> None:
    seconds = float(os.environ.get("CHAOS_SECONDS", "300"))
    rate = float(os.environ.get("CHAOS_RATE", "500"))
    report = run_soak(
        tmp_path, broker, daemon_factory, seconds=seconds, rate=rate, fault_every=(1.0, 3.5)
    )
    print("\n" + report.render())
    assert report.fault_total >= min(100, int(seconds / 3))
    assert not report.lost_ours, report.render()
