"""What each runner counts, and the heartbeat the main thread builds from it.

A runner owns its RunnerState and is its only writer; the main thread only reads (sums) it, so no
lock is needed: a heartbeat may be one message behind, never wrong for long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from routemqd.protocol import DURATION_BUCKETS


@dataclass
class RunnerState:
    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    busy_since: float | None = None
    busy_topic: str = ""
    busy_thread: int | None = None
    stuck_reported: bool = False
    last_error: str = ""
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0  # seconds spent in handlers that returned
    cell: int = 0  # this runner's cell on the in-flight board
    fingerprint: bytes | None = None
    resolved: list[bytes] = field(default_factory=list)  # earlier crashers now finished


def busiest(states: list[RunnerState], now: float) -> tuple[float, RunnerState | None]:
    """The runner whose handler has been running longest, and for how long."""
    busy_for, busy = 0.0, None
    for s in states:
        since = s.busy_since
        if since is not None and now - since > busy_for:
            busy_for, busy = now - since, s
    return busy_for, busy


def totals(states: list[RunnerState], now: float) -> dict[str, object]:
    """The runner part of a heartbeat. ``busy_seconds`` (handlers that returned plus the time
    of those still running) lets the master compute a busy fraction between two beats."""
    buckets = [0] * (len(DURATION_BUCKETS) + 1)
    for s in states:
        for i, c in enumerate(s.buckets):
            buckets[i] += c
    done = sum(s.duration_sum for s in states)
    running = sum(now - s.busy_since for s in states if s.busy_since is not None)
    return {
        "handled": sum(s.handled for s in states),
        "failed": sum(s.failed for s in states),
        "dead_lettered": sum(s.dead_lettered for s in states),
        "inflight": sum(1 for s in states if s.busy_since is not None),
        "last_error": next((s.last_error for s in states if s.last_error), ""),
        "buckets": buckets,
        "duration_sum": round(done, 6),
        "busy_seconds": round(done + running, 6),
    }


def take_resolved(states: list[RunnerState]) -> list[str]:
    out: list[str] = []
    for s in states:
        taken, s.resolved = s.resolved, []
        out.extend(d.hex() for d in taken)
    return out
