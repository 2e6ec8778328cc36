"""Health checks: sample a worker with psutil, judge it with a pure function, then act.

Sampling and judging are split so the rules (what is stuck, what is too big, how long CPU must be
high) are tested without real processes. The ``psutil.Process`` objects are cached per worker:
``cpu_percent()`` only means something as a delta between two calls on the same object, and the
cached ``create_time`` lets us refuse to signal a PID that the kernel has already reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psutil

from routemqd.procs import Proc


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


def frozen(proc: Proc, now: float) -> Verdict:
    """Silent past ``heartbeat_timeout``: a frozen process cannot drain anything, so there is
    no point in waiting for it. Workers beat while they stop too, so this judges those as well."""
    silent = now - proc.last_heartbeat
    if silent > proc.spec.route.heartbeat_timeout:
        return Verdict(Action.KILL, f"no heartbeat for {silent:.0f}s (frozen process?)")
    return HEALTHY


def assess(proc: Proc, now: float, min_lifetime: float) -> Verdict:
    """Judge one running worker. A stopping one is judged by :func:`frozen` only: the rest is
    ruled by its stop deadline."""
    route = proc.spec.route
    verdict = frozen(proc, now)
    if verdict.action is not Action.NONE:
        return verdict
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


def check(table: Any, now: float) -> None:
    """Judge every running worker of the slot table: kill the stuck and frozen at once, recycle
    the oversized ones gracefully, one slot of a pool at a time."""
    min_life = table.supervisor.recycle_min_lifetime
    recycling = {s.pool for s in table.slots.values() if s.incoming or s.replace_reason}
    for slot in list(table.slots.values()):
        for proc in slot.live:
            if proc.killed or not sample(proc):
                continue  # gone or a zombie, or killed already: the reaper handles it
            if proc.held and proc is slot.incoming and proc.stop_mode is None:
                continue  # warming and idle by design
            stopping = proc.stop_mode is not None
            verdict = frozen(proc, now) if stopping else assess(proc, now, min_life)
            if verdict.action == Action.KILL:
                table.log.error(
                    "worker_unhealthy",
                    **proc.label,
                    reason=verdict.reason,
                    action="kill",
                    busy_topic=proc.stats.get("busy_topic") or None,
                )
                table.kill_stuck(slot, proc, verdict.reason, now)
            elif verdict.action == Action.RECYCLE and proc is slot.proc:
                if slot.pool in recycling:
                    continue  # one slot of a pool at a time
                recycling.add(slot.pool)
                table.log.warning("worker_recycle", **proc.label, reason=verdict.reason)
                slot.replace_reason = verdict.reason
                slot.next_spec = slot.spec
