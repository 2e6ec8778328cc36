"""The worker's heartbeat cadence against the master's frozen-worker rule."""

from __future__ import annotations

import pytest

from routemqd.worker.lifecycle import (
    BEATS_PER_TIMEOUT,
    HEARTBEAT_INTERVAL,
    beat_interval,
    until_next_beat,
)


def test_default_timeout_beats_once_a_second() -> None:
    assert beat_interval(60.0) == HEARTBEAT_INTERVAL


@pytest.mark.parametrize("timeout", [1.0, 1.5, 2.0, 3.9, 4.0, 10.0, 60.0])
def test_a_healthy_worker_beats_several_times_within_its_timeout(timeout: float) -> None:
    """The master kills after ``heartbeat_timeout`` of silence: with one beat per timeout (the
    manifest's minimum is 1 s), any scheduling delay would get a healthy worker killed."""
    assert timeout / beat_interval(timeout) >= BEATS_PER_TIMEOUT


@pytest.mark.parametrize("interval", [0.25, 0.5, 1.0])
def test_next_tick_is_within_one_interval(interval: float) -> None:
    for _ in range(100):
        assert 0.0 < until_next_beat(interval) <= interval
