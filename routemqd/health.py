"""Health checks: sample a worker with psutil, then judge it with a pure function.

Sampling and judging are split so the rules (what is stuck, what is too big, how long CPU must be
high) are tested without real processes. The ``psutil.Process`` objects are cached per worker:
``cpu_percent()`` only means something as a delta between two calls on the same object, and the
cached ``create_time`` lets us refuse to signal a PID that the kernel has already reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import psutil

from routemqd.slots import Proc


class Action(StrEnum):
    NONE = "none"
    KILL = "kill"  # stuck or frozen: it cannot drain, so SIGKILL at once
    RECYCLE = "recycle"  # unhealthy but working: replace gracefully, one slot at a time


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""


HEALTHY = Verdict(Action.NONE)


def sample(proc: Proc) -> bool:
    """Refresh RSS and CPU from the kernel. False when the process is gone or a zombie."""
    ps = proc.ps
    if ps is None:
        return False
    try:
        with ps.oneshot():
            if ps.status() == psutil.STATUS_ZOMBIE:
                return False
            proc.rss = ps.memory_info().rss
            proc.cpu = ps.cpu_percent(None)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return True


def same_process(proc: Proc) -> bool:
    """True when ``proc.pid`` still names the process we forked (not a reused PID)."""
    try:
        return proc.ps is not None and proc.ps.create_time() == proc.create_time
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def assess(proc: Proc, now: float, min_lifetime: float) -> Verdict:
    """Judge one running worker. Stopping workers are not judged: their deadline rules them."""
    route = proc.spec.route
    silent = now - proc.last_heartbeat
    if silent > route.heartbeat_timeout:
        # a frozen process cannot drain anything: no point in waiting for it
        return Verdict(Action.KILL, f"no heartbeat for {silent:.0f}s (frozen process?)")
    deadline = route.handler_timeout or route.heartbeat_timeout
    busy = float(proc.stats.get("busy_for", 0.0) or 0.0)
    if busy > deadline:
        topic = proc.stats.get("busy_topic", "")
        return Verdict(Action.KILL, f"handler stuck for {busy:.0f}s on {topic!r}")
    lifetime = now - proc.started_at
    if route.max_memory is not None and proc.rss > route.max_memory and lifetime >= min_lifetime:
        return Verdict(Action.RECYCLE, f"rss {proc.rss // (1024 * 1024)}MiB over max_memory")
    if route.max_cpu is not None:
        if proc.cpu > route.max_cpu:
            if proc.cpu_high_since is None:
                proc.cpu_high_since = now
            elif now - proc.cpu_high_since >= route.cpu_window and lifetime >= min_lifetime:
                return Verdict(
                    Action.RECYCLE, f"cpu above {route.max_cpu:g}% for {route.cpu_window:g}s"
                )
        else:
            proc.cpu_high_since = None
    return HEALTHY
