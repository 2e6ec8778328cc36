"""Read-only views of the slot table: counter totals, ready counts, ``status`` and the summary.

Everything a reader outside the loop sees (the control socket, ``/metrics``, systemd's STATUS=)
is computed here from the slots, so the numbers agree wherever they are shown. Counters are
monotonic across worker incarnations: a worker's totals are banked into its slot when it exits
(:func:`bank`), and :func:`totals` adds the live worker's heartbeat to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from routemqd.procs import Proc
from routemqd.protocol import DURATION_BUCKETS
from routemqd.slots import SERVING, Slot, State

OUTCOMES = ("handled", "failed", "dead_lettered", "dropped")  # the ``outcome`` metric label
COUNTERS = ("received", *OUTCOMES, "duration_sum")
NBUCKETS = len(DURATION_BUCKETS) + 1


def totals(slot: Slot) -> dict[str, Any]:
    """Every counter of the slot over all its workers so far, the live one included."""
    base = slot.counters_base
    stats = slot.proc.stats if slot.proc is not None else {}
    out: dict[str, Any] = {
        name: float(base.get(name, 0) or 0) + float(stats.get(name, 0) or 0) for name in COUNTERS
    }
    buckets = [0] * NBUCKETS
    for source in (base.get("buckets") or [], stats.get("buckets") or []):
        for i, c in enumerate(source[:NBUCKETS]):
            buckets[i] += c
    out["buckets"] = buckets
    return out


def bank(slot: Slot, proc: Proc) -> None:
    """``proc`` exited: keep its counters in the slot (Prometheus counters never go back)."""
    base = slot.counters_base
    for name in COUNTERS:
        base[name] = float(base.get(name, 0) or 0) + float(proc.stats.get(name, 0) or 0)
    banked = list(base.get("buckets") or [0] * NBUCKETS)
    for i, c in enumerate((proc.stats.get("buckets") or [])[:NBUCKETS]):
        if i < len(banked):
            banked[i] += c
    base["buckets"] = banked
    proc.stats = {}


def counts(slots: Iterable[Slot]) -> tuple[int, int, int]:
    """(ready, startable, failed) over the slots that should run."""
    ready = startable = failed = 0
    for slot in slots:
        if slot.retiring:
            continue
        if slot.state is State.FAILED:
            failed += 1
            continue
        startable += 1
        if slot.state in SERVING:
            ready += 1
    return ready, startable, failed


def summary_line(
    ready: int, startable: int, failed: int, last_reload_ok: bool, waiting: str = ""
) -> str:
    line = f"{ready}/{startable} workers ready, {failed} failed"
    if not last_reload_ok:
        line += ", last reload failed"
    if waiting and ready < startable:
        line += f"; {waiting}"
    return line


def waiting_for(slots: Iterable[Slot]) -> str:
    """Why workers that should serve do not: the first broker problem a heartbeat reported
    (``broker 10.0.0.5:1883 unreachable: [Errno 111] Connection refused``), or ""."""
    for slot in slots:
        proc = slot.proc
        if slot.retiring or slot.state in SERVING or proc is None:
            continue
        problem = proc.stats.get("broker_problem")
        if problem:
            return str(problem)
    return ""


def _connected(proc: Proc) -> bool:
    """The last heartbeat says. A worker beats just before it reports ``ready``, so a ready
    worker's last heartbeat is never one from before its CONNACK; with none yet, ready means
    subscribed, so connected."""
    if "connected" in proc.stats:
        return bool(proc.stats["connected"])
    return proc.ready_at is not None


def slot_view(slot: Slot, now: float) -> dict[str, Any]:
    """One row of ``routemqd status``."""
    proc = slot.proc
    stats = proc.stats if proc is not None else {}
    total = totals(slot)
    return {
        "route": slot.spec.route.name,
        "index": slot.spec.index,
        "state": slot.shown,
        "pid": proc.pid if proc else None,
        "client_id": slot.spec.client_id,
        "connected": _connected(proc) if proc else False,
        "broker_problem": stats.get("broker_problem") or "",
        "uptime": round(now - proc.started_at, 1) if proc else None,
        "restarts": slot.restarts,
        "last_reason": slot.last_reason,
        "rss": proc.rss if proc else None,
        "cpu": round(proc.cpu, 1) if proc else None,
        "handled": int(total["handled"]),
        "failed": int(total["failed"]),
        "last_error": stats.get("last_error") or "",
        "replacing": slot.incoming is not None,
    }


def snapshot(master: Any, now: float) -> dict[str, Any]:
    """``routemqd status``: the daemon, every pool's size and every slot."""
    slots = list(master.table.slots.values())
    ready, startable, failed = counts(slots)
    return {
        "daemon": {
            "pid": master.pid,
            "uptime": round(now - master.started, 1),
            "manifest": master.manifest.path,
            "host_id": master.manifest.host_id,
            "shutting_down": master.shutting_down,
            "ready": ready,
            "startable": startable,
            "failed": failed,
            "last_reload": master.last_reload,
        },
        "pools": [v.as_json() for v in master.pool_views()],
        "slots": [slot_view(s, now) for s in slots],
    }
