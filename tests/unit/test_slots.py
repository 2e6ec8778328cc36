"""Tests for routemqd.slots: the restart policy after a worker exits, on fake monotonic time."""

from __future__ import annotations

import random
from typing import Any

import pytest

from routemqd.manifest import SupervisorConfig
from routemqd.plan import SlotSpec
from routemqd.restarts import after_exit, backoff_delay
from routemqd.slots import Slot, State
from tests.unit import fakes

JITTER = 0.2


def config(**supervisor: Any) -> SupervisorConfig:
    return fakes.manifest(**supervisor).supervisor


def spec() -> SlotSpec:
    return fakes.specs(fakes.manifest())[0]


def crash(
    slot: Slot,
    now: float,
    cfg: SupervisorConfig,
    *,
    healthy: bool = False,
    boot: bool = False,
    seed: int = 0,
) -> Any:
    return after_exit(slot, now, healthy, boot, cfg, random.Random(seed))


def test_first_crash_restarts_at_once() -> None:
    cfg = config()
    decision = crash(Slot(spec=spec()), 100.0, cfg)
    assert decision.state == State.STARTING
    assert decision.delay == 0.0


def test_crash_loop_backs_off_with_growing_jittered_delays() -> None:
    cfg = config(backoff_initial=0.1, backoff_max=5, failure_limit=100)
    slot = Slot(spec=spec())
    assert crash(slot, 0.0, cfg).delay == 0.0
    delays = []
    for n in range(2, 8):
        decision = crash(slot, float(n), cfg, seed=n)
        assert decision.state == State.BACKOFF
        base = min(cfg.backoff_max, cfg.backoff_initial * 2 ** (n - 2))
        assert base * (1 - JITTER) <= decision.delay <= min(cfg.backoff_max, base * (1 + JITTER))
        delays.append(decision.delay)
    assert delays == sorted(delays)
    assert len(set(delays)) == len(delays)


def test_backoff_is_capped() -> None:
    cfg = config(backoff_initial=0.1, backoff_max=2)
    rng = random.Random(7)
    for consecutive in range(2, 60):
        delay = backoff_delay(consecutive, cfg, rng)
        assert 0 < delay <= cfg.backoff_max
    capped = [backoff_delay(40, cfg, rng) for _ in range(200)]
    assert min(capped) >= cfg.backoff_max * (1 - JITTER)
    assert max(capped) <= cfg.backoff_max


def test_jitter_stays_within_twenty_percent_and_varies() -> None:
    cfg = config(backoff_initial=1, backoff_max=1000)
    rng = random.Random(3)
    samples = [backoff_delay(4, cfg, rng) for _ in range(500)]
    assert min(samples) >= 4 * (1 - JITTER)
    assert max(samples) <= 4 * (1 + JITTER)
    assert max(samples) - min(samples) > 4 * JITTER  # spread, not a constant
    assert backoff_delay(1, cfg, rng) <= cfg.backoff_initial * (1 + JITTER)


def test_healthy_run_resets_the_backoff() -> None:
    cfg = config(failure_limit=100)
    slot = Slot(spec=spec())
    for n in range(5):
        crash(slot, float(n), cfg)
    assert slot.consecutive_failures == 5
    decision = crash(slot, 20.0, cfg, healthy=True)
    assert decision.state == State.STARTING
    assert decision.delay == 0.0
    assert slot.consecutive_failures == 1
    second = crash(slot, 21.0, cfg)
    assert second.state == State.BACKOFF
    assert second.delay <= cfg.backoff_initial * (1 + JITTER)


def test_failure_limit_within_window_parks_the_slot() -> None:
    cfg = config(failure_limit=4, failure_window=10, failed_cooldown=7)
    slot = Slot(spec=spec())
    states = [crash(slot, t, cfg).state for t in (0.0, 1.0, 2.0)]
    assert State.FAILED not in states
    decision = crash(slot, 3.0, cfg)
    assert decision.state == State.FAILED
    assert decision.delay == cfg.failed_cooldown
    assert "4 failures" in decision.reason


def test_failures_outside_the_window_do_not_count() -> None:
    cfg = config(failure_limit=3, failure_window=10)
    slot = Slot(spec=spec())
    for t in (0.0, 20.0, 40.0, 60.0, 80.0):
        decision = crash(slot, t, cfg, healthy=True)
        assert decision.state == State.STARTING
        assert len(slot.failures) == 1


@pytest.mark.parametrize("healthy", [False, True])
def test_boot_failure_fails_at_once(healthy: bool) -> None:
    cfg = config(failed_cooldown=9)
    slot = Slot(spec=spec())
    decision = crash(slot, 5.0, cfg, boot=True, healthy=healthy)
    assert decision.state == State.FAILED
    assert decision.delay == 9
    assert decision.reason == "boot failure"
