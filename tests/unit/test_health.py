"""Tests for routemqd.health.assess: the verdicts on a worker, judged on fake samples."""

from __future__ import annotations

from typing import Any

import yaml

from routemqd.health import Action, assess, sample
from routemqd.manifest import loads
from routemqd.plan import slots_for
from routemqd.procs import Proc, same_process
from routemqd.protocol import LineReader

MiB = 1024 * 1024
MIN_LIFETIME = 30.0


def fake_proc(now: float = 1000.0, started_ago: float = 100.0, **route: Any) -> Proc:
    settings: dict[str, Any] = {
        "name": "r",
        "topic": "a/b",
        "handler": "m:f",
        "heartbeat_timeout": 10,
        "max_memory": "64MiB",
        **route,
    }
    doc = {"routes": [settings]}
    spec = next(iter(slots_for(loads(yaml.safe_dump(doc), "<health>", environ={})).values()))
    return Proc(
        pid=999_999,
        spec=spec,
        started_at=now - started_ago,
        status_fd=-1,
        command_fd=-1,
        reader=LineReader(-1),
        ps=None,
        create_time=0.0,
        last_heartbeat=now,
    )


def test_a_fresh_idle_worker_is_healthy() -> None:
    proc = fake_proc()
    proc.rss = 10 * MiB
    assert assess(proc, 1000.0, MIN_LIFETIME).action == Action.NONE


def test_heartbeat_silence_kills() -> None:
    proc = fake_proc(heartbeat_timeout=10)
    assert assess(proc, 1009.0, MIN_LIFETIME).action == Action.NONE
    verdict = assess(proc, 1010.5, MIN_LIFETIME)
    assert verdict.action == Action.KILL
    assert "heartbeat" in verdict.reason


def test_busy_past_handler_timeout_kills() -> None:
    proc = fake_proc(heartbeat_timeout=60, handler_timeout=3)
    proc.stats = {"busy_for": 2.5, "busy_topic": "a/b"}
    assert assess(proc, 1000.0, MIN_LIFETIME).action == Action.NONE
    proc.stats = {"busy_for": 3.5, "busy_topic": "a/b"}
    verdict = assess(proc, 1000.0, MIN_LIFETIME)
    assert verdict.action == Action.KILL
    assert "'a/b'" in verdict.reason


def test_busy_past_heartbeat_timeout_kills_without_handler_timeout() -> None:
    proc = fake_proc(heartbeat_timeout=10)
    proc.stats = {"busy_for": 9.0, "busy_topic": "a/b"}
    assert assess(proc, 1000.0, MIN_LIFETIME).action == Action.NONE
    proc.stats = {"busy_for": 11.0, "busy_topic": "a/b"}
    assert assess(proc, 1000.0, MIN_LIFETIME).action == Action.KILL


def test_rss_over_max_memory_recycles_after_min_lifetime() -> None:
    proc = fake_proc(started_ago=MIN_LIFETIME + 1)
    proc.rss = 64 * MiB
    assert assess(proc, 1000.0, MIN_LIFETIME).action == Action.NONE  # at the limit, not over
    proc.rss = 65 * MiB
    verdict = assess(proc, 1000.0, MIN_LIFETIME)
    assert verdict.action == Action.RECYCLE
    assert "rss" in verdict.reason


def test_rss_over_max_memory_waits_for_min_lifetime() -> None:
    proc = fake_proc(started_ago=5)
    proc.rss = 500 * MiB
    assert assess(proc, 1000.0, MIN_LIFETIME).action == Action.NONE
    later = 1000.0 + MIN_LIFETIME - 5
    proc.last_heartbeat = later
    assert assess(proc, later - 0.5, MIN_LIFETIME).action == Action.NONE
    assert assess(proc, later, MIN_LIFETIME).action == Action.RECYCLE


def test_no_memory_limit_never_recycles() -> None:
    proc = fake_proc(max_memory=None)
    proc.rss = 10_000 * MiB
    assert assess(proc, 1000.0, MIN_LIFETIME).action == Action.NONE


def test_sustained_cpu_recycles() -> None:
    proc = fake_proc(max_cpu=80, cpu_window=5)
    proc.cpu = 99.0
    t = 1000.0
    while t < 1005.0:
        proc.last_heartbeat = t
        assert assess(proc, t, MIN_LIFETIME).action == Action.NONE
        t += 1.0
    proc.last_heartbeat = t
    verdict = assess(proc, t, MIN_LIFETIME)
    assert verdict.action == Action.RECYCLE
    assert "cpu" in verdict.reason


def test_a_cpu_spike_is_forgiven() -> None:
    proc = fake_proc(max_cpu=80, cpu_window=5)
    t = 1000.0
    for step in range(30):
        proc.cpu = 99.0 if step % 4 != 3 else 10.0  # high for 3 s, then a quiet second
        proc.last_heartbeat = t
        assert assess(proc, t, MIN_LIFETIME).action == Action.NONE
        t += 1.0


def test_sustained_cpu_in_a_young_worker_waits_for_min_lifetime() -> None:
    proc = fake_proc(started_ago=1, max_cpu=80, cpu_window=5)
    proc.cpu = 99.0
    verdicts = []
    for step in range(40):
        now = 1000.0 + step
        proc.last_heartbeat = now
        verdicts.append(assess(proc, now, MIN_LIFETIME).action)
    first = verdicts.index(Action.RECYCLE)
    assert 1 + first >= MIN_LIFETIME  # lifetime at the first recycle verdict


def test_sampling_without_a_process_reports_gone() -> None:
    proc = fake_proc()
    assert sample(proc) is False
    assert same_process(proc) is False
