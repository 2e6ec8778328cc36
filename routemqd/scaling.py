"""The master's scaling pass: measure each autoscaled pool, ask the scaler, resize the pool.

:mod:`routemqd.scaler` decides on plain numbers; this module is the part that knows the master.
Once per health tick (after psutil has refreshed every worker's CPU) it turns each slot of an
autoscaled pool into a :class:`~routemqd.scaler.WorkerSample` (its last heartbeat's counters and
its CPU), samples the host once, keeps each pool's :class:`~routemqd.scaler.PoolState`, and
applies a changed target through the slot table's :meth:`~routemqd.slottable.SlotTable.add` and
:meth:`~routemqd.slottable.SlotTable.retire`, the same two doors a reload uses. A slot removed here
therefore retires like any other: unsubscribe, drain, end the session.

Reload keeps a grown pool grown: :meth:`Autoscaler.running` gives the plan what each pool runs
now, so an unrelated edit does not send an autoscaled pool back to ``min``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil
import structlog

from routemqd import plan, scaler
from routemqd.manifest import Manifest
from routemqd.poolview import PoolView, pool_views
from routemqd.scaler import HostSample, PoolState, WorkerSample
from routemqd.slots import SERVING, Slot

HostSampler = Callable[[], HostSample]


def sample_host() -> HostSample:
    """The host's CPU over all cores since the previous call (the previous scaling pass)."""
    try:
        load1: float | None = os.getloadavg()[0]
    except OSError:
        load1 = None
    return HostSample(cpu=psutil.cpu_percent(None) / 100, load1=load1, cpus=os.cpu_count() or 1)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _fraction(value: Any) -> float:
    """``window_full`` is a flag in the heartbeat (a fraction would be taken as it is)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return float(value) if isinstance(value, int | float) else 0.0


def worker_sample(slot: Slot) -> WorkerSample:
    """One slot as the scaler sees it: counters from its worker's last heartbeat, CPU from psutil.

    Ready means serving and not asked to stop: a worker that drains is not taking new messages,
    so its numbers say nothing about the pool's load.
    """
    route = slot.spec.route
    proc = slot.proc
    if proc is None:
        return WorkerSample(slot.spec.index, None, False, concurrency=route.concurrency)
    stats = proc.stats
    return WorkerSample(
        index=slot.spec.index,
        pid=proc.pid,
        ready=slot.state in SERVING and proc.stop_mode is None and proc.ready_at is not None,
        at=proc.stats_at,
        busy_seconds=_number(stats.get("busy_seconds")),
        handled=_number(stats.get("handled")),
        cpu=proc.cpu / 100,
        window_full=_fraction(stats.get("window_full")),
        concurrency=route.concurrency,
    )


def members(slots: Iterable[Slot]) -> dict[str, list[Slot]]:
    """The slots that should run, per pool, by index. Retiring slots are on their way out."""
    out: dict[str, list[Slot]] = {}
    for slot in slots:
        if not slot.retiring:
            out.setdefault(slot.pool, []).append(slot)
    for pool in out.values():
        pool.sort(key=lambda s: s.spec.index)
    return out


class Autoscaler:
    """Per autoscaled pool: the scaler's state between passes, and the resize it asks for."""

    def __init__(self, table: Any, host: HostSampler = sample_host) -> None:
        self.table = table
        self.host = host
        self.states: dict[str, PoolState] = {}
        self.log = structlog.get_logger("routemqd.master")

    def running(self) -> dict[str, int]:
        """What each pool runs now, as the plan's ``running=``: the scaler's target where it has
        one, else the slots that stay (a fixed pool a reload may turn into a range)."""
        counts = {pool: len(slots) for pool, slots in members(self.table.slots.values()).items()}
        counts.update({pool: state.desired for pool, state in self.states.items()})
        return counts

    def run(self, manifest: Manifest, now: float) -> bool:
        """One pass over every autoscaled pool. True when a pool was resized."""
        autoscaled = [r for r in manifest.routes if r.scaling is not None]
        for name in set(self.states) - {r.name for r in autoscaled}:
            del self.states[name]  # removed, or a fixed pool now
        if not autoscaled:
            return False
        host = self.host()
        pools = members(self.table.slots.values())
        resized = False
        for route in autoscaled:
            assert route.scaling is not None
            slots = pools.get(route.name, [])
            state = self.states.get(route.name) or scaler.initial_state(
                route.scaling, running=len(slots)
            )
            samples = tuple(worker_sample(s) for s in slots)
            new, decision = scaler.tick(state, samples, host, route.scaling, now)
            self.states[route.name] = new
            if scaler.should_log(state.last, decision):
                self.log.info("pool_scaled", pool=route.name, **decision.log_fields())
            if decision.desired != len(slots):
                self._resize(manifest, route.name, decision.desired, now)
                resized = True
        return resized

    def _resize(self, manifest: Manifest, pool: str, desired: int, now: float) -> None:
        for change in plan.resize(self.table.current_specs(), manifest, pool, desired):
            if change.action == "start":
                self.table.add(change.new, now)
            else:
                self.table.retire(self.table.slots[change.key], now)

    def views(self, manifest: Manifest) -> list[PoolView]:
        """Every pool's min, max, desired and actual size, and the scaler's last word on it."""
        actual = ready_by_pool(self.table.slots.values())
        decisions = {name: state.last for name, state in self.states.items()}
        retiring: dict[str, int] = {}
        for slot in self.table.slots.values():
            if slot.retiring:
                retiring[slot.pool] = retiring.get(slot.pool, 0) + 1
        return pool_views(plan.pools_for(manifest), actual, decisions, retiring)


def ready_by_pool(slots: Iterable[Slot]) -> Mapping[str, int]:
    """Workers serving and not on their way out, per pool: a pool's actual size."""
    out: dict[str, int] = {}
    for slot in slots:
        proc = slot.proc
        if slot.retiring or slot.state not in SERVING or proc is None:
            continue
        if proc.stop_mode is not None:
            continue
        out[slot.pool] = out.get(slot.pool, 0) + 1
    return out
