"""The autoscaler's policy: from what the master measures to one decision per pool per tick.

Pure on purpose: no clock, no psutil, no slots. The master gathers one ``WorkerSample`` per slot
that should run and one ``HostSample``, calls ``tick()`` with the pool's previous ``PoolState``
and its monotonic time, keeps the new state, and starts or retires slots to reach
``Decision.desired`` (``plan.resize``). Every rule below is a plain comparison, so each is
unit-tested with a fake clock and no broker.

A worker's **load** is the largest of three fractions, each 0..1 over the last interval:
the handler's busy time (wall time spent in handlers, per concurrency slot), its process CPU (one
core is all a worker can use: for cheap handlers MQTT parsing is the cost, not the handler), and
the time it sat with a full in-flight window (the broker holds further messages back).

Why these rules:

* **Up fast, one step at a time.** The pool must stay saturated for ``up_after``; a step then
  adds one worker and the clock starts again only once every worker, the new one included, is
  ready and measured. Growth is never judged on numbers that predate it.
* **Only what helps.** No step while the host's CPU over all cores is above ``host_cpu_max``:
  another process on saturated cores only adds contention. And when a step up did not raise the
  pool's throughput by at least half of what one more worker should bring, the bottleneck is
  elsewhere (the host, a database): the pool stops growing until it is no longer saturated.
* **A busy member is not a busy pool.** The broker deals a shared subscription out message by
  message, ignoring speed, so real overload saturates every member at once. One member busy while
  the others idle is a backlog queued in that member's session (it restarted, or it got a run of
  slow messages): a new member would only take a share of *new* messages, never that backlog. A
  step up therefore needs the pool's mean load above ``busy_high`` *and* a majority of members
  saturated.
* **Down slowly, with hysteresis.** One fewer only when the pool's total load spread over n-1
  workers stays below ``busy_low`` for ``down_after``, and at least ``down_after`` after the last
  step. ``busy_low < busy_high`` (the manifest enforces it) means the step down cannot make the
  pool saturated again: no flapping. A worker not measured yet (just started, restarting) counts
  as unknown, never as idle.
* **Bounds act at once.** A desired count above a new ``max`` drops to it, below a new ``min``
  rises to it, whatever the measurements say: the operator asked for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from routemqd.manifest import Scaling


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


class Reason(StrEnum):
    SATURATED = "saturated"  # up: the pool stayed saturated for up_after
    BELOW_MIN = "below_min"  # up: the range's min rose (reload)
    ABOVE_MAX = "above_max"  # down: the range's max fell (reload)
    UNDERUSED = "underused"  # down: n-1 workers would stay below busy_low
    STEADY = "steady"
    AT_MIN = "at_min"
    AT_MAX = "at_max"
    RESIZING = "resizing"  # the slots do not match the last decision yet
    MEASURING = "measuring"  # some worker has no measurement yet
    SATURATION_BRIEF = "saturation_brief"  # saturated, for less than up_after so far
    NO_HOST_HEADROOM = "no_host_headroom"
    STEP_DID_NOT_HELP = "step_did_not_help"
    ONE_MEMBER_BUSY = "one_member_busy"  # a backlog in one session, not pool overload
    COOLING_DOWN = "cooling_down"  # underused, for less than down_after so far


#: Holds worth a log line when they start: they explain why a busy pool does not grow.
NOTABLE_HOLDS = frozenset(
    {Reason.NO_HOST_HEADROOM, Reason.STEP_DID_NOT_HELP, Reason.ONE_MEMBER_BUSY}
)

#: A step up must add at least this share of one worker's ideal gain (1/n of the pool's rate).
MIN_GAIN_OF_IDEAL = 0.5


@dataclass(frozen=True)
class WorkerSample:
    """One slot that should run, as the master sees it this tick.

    Counters are cumulative for the worker process (``pid``); a new pid starts a new series.
    ``None`` means not reported yet. ``at`` is the time of the heartbeat that carried them.
    """

    index: int
    pid: int | None
    ready: bool  # subscribed and not stopping
    at: float | None = None
    busy_seconds: float | None = None  # handler wall time since the worker started
    handled: float | None = None  # messages finished since the worker started
    cpu: float | None = None  # fraction of one core over the master's last psutil interval
    window_full: float = 0.0  # 0..1: share of the interval with a full in-flight window
    concurrency: int = 1


@dataclass(frozen=True)
class HostSample:
    """``psutil.cpu_percent() / 100`` over all cores; the load average is the fallback."""

    cpu: float | None
    load1: float | None = None
    cpus: int = 1

    @property
    def busy(self) -> float | None:
        if self.cpu is not None:
            return self.cpu
        if self.load1 is not None:
            return self.load1 / max(1, self.cpus)
        return None


@dataclass(frozen=True)
class Reading:
    """The scaler's memory of one worker: its last counters and the load derived from them."""

    pid: int
    at: float
    busy_seconds: float
    handled: float
    load: float | None = None  # None until two readings of the same process exist
    rate: float = 0.0  # messages per second over the last interval


@dataclass(frozen=True)
class Measures:
    """The numbers a decision rests on; they go into the ``pool_scaled`` event and status."""

    workers: int
    measured: int
    load: float | None  # mean over measured workers
    total: float  # sum of loads: the pool's work in units of one worker
    saturated: int  # members at or above busy_high
    rate: float | None  # messages per second, measured workers
    host_cpu: float | None


@dataclass(frozen=True)
class Decision:
    direction: Direction
    reason: Reason
    previous: int
    desired: int
    measures: Measures

    def log_fields(self) -> dict[str, Any]:
        m = self.measures
        return {
            "direction": self.direction.value,
            "reason": self.reason.value,
            "previous": self.previous,
            "desired": self.desired,
            "load": _round(m.load),
            "saturated": m.saturated,
            "measured": m.measured,
            "workers": m.workers,
            "rate": _round(m.rate, 1),
            "host_cpu": _round(m.host_cpu),
        }


@dataclass(frozen=True)
class PoolState:
    """What the scaler remembers about one pool between ticks. Replaced, never mutated."""

    desired: int
    readings: dict[int, Reading] = field(default_factory=dict)
    saturated_since: float | None = None
    low_since: float | None = None
    last_step_at: float | None = None
    rate_sum: float = 0.0  # per-tick pool rates while saturated, for the mean at a step
    rate_ticks: int = 0
    rate_before_step: float | None = None  # set by a step up until it is judged
    stalled: bool = False  # a step up did not help: no growth until saturation ends
    last: Decision | None = None


def initial_state(scaling: Scaling, running: int | None = None) -> PoolState:
    """A new pool starts at ``min``; a pool that already runs (a fixed pool a reload turned into a
    range, or a range whose bounds changed) starts from what it runs, held inside the range."""
    if running is None:
        return PoolState(desired=scaling.min)
    return PoolState(desired=max(scaling.min, min(scaling.max, running)))


def should_log(previous: Decision | None, decision: Decision) -> bool:
    """Every step, and a notable hold when it starts (not on every tick it lasts)."""
    if decision.direction is not Direction.HOLD:
        return True
    if decision.reason not in NOTABLE_HOLDS:
        return False
    return previous is None or previous.reason is not decision.reason


def tick(
    state: PoolState,
    workers: tuple[WorkerSample, ...],
    host: HostSample,
    scaling: Scaling,
    now: float,
) -> tuple[PoolState, Decision]:
    """One pool, one tick: the new state and what the pool's size should be."""
    readings = _update_readings(state.readings, workers)
    measures = _measure(workers, readings, host, scaling)
    state = replace(state, readings=readings)
    k = scaling.knobs
    n = state.desired

    def decide(direction: Direction, reason: Reason, **changes: Any) -> tuple[PoolState, Decision]:
        desired = n + (1 if direction is Direction.UP else -1 if direction is Direction.DOWN else 0)
        desired = changes.pop("desired", desired)
        decision = Decision(direction, reason, n, desired, measures)
        return replace(state, desired=desired, last=decision, **changes), decision

    reset = {"saturated_since": None, "low_since": None, "rate_sum": 0.0, "rate_ticks": 0}
    if n > scaling.max:
        return decide(
            Direction.DOWN, Reason.ABOVE_MAX, desired=scaling.max, last_step_at=now, **reset
        )
    if n < scaling.min:
        return decide(
            Direction.UP, Reason.BELOW_MIN, desired=scaling.min, last_step_at=now, **reset
        )
    if len(workers) != n:
        return decide(Direction.HOLD, Reason.RESIZING, **reset)
    if measures.measured < n or measures.load is None:
        return decide(Direction.HOLD, Reason.MEASURING, **reset)

    if measures.load >= k.busy_high and 2 * measures.saturated <= n:
        return decide(Direction.HOLD, Reason.ONE_MEMBER_BUSY, **reset)
    if measures.load >= k.busy_high:
        return _when_saturated(state, measures, host, scaling, now, decide)

    # Not saturated: the episode is over, and with it any step still being judged or a stall.
    cleared = {
        "saturated_since": None,
        "rate_sum": 0.0,
        "rate_ticks": 0,
        "stalled": False,
        "rate_before_step": None,
    }
    if n <= scaling.min or measures.total / (n - 1) >= k.busy_low:
        reason = Reason.AT_MIN if n <= scaling.min else Reason.STEADY
        return decide(Direction.HOLD, reason, low_since=None, **cleared)
    low_since = state.low_since if state.low_since is not None else now
    since_step = math.inf if state.last_step_at is None else now - state.last_step_at
    if now - low_since >= k.down_after and since_step >= k.down_after:
        return decide(
            Direction.DOWN,
            Reason.UNDERUSED,
            low_since=None,
            last_step_at=now,
            **cleared,
        )
    return decide(Direction.HOLD, Reason.COOLING_DOWN, low_since=low_since, **cleared)


def _when_saturated(
    state: PoolState,
    measures: Measures,
    host: HostSample,
    scaling: Scaling,
    now: float,
    decide: Any,
) -> tuple[PoolState, Decision]:
    k = scaling.knobs
    n = state.desired
    since = state.saturated_since if state.saturated_since is not None else now
    acc = {
        "saturated_since": since,
        "low_since": None,
        "rate_sum": state.rate_sum + (measures.rate or 0.0),
        "rate_ticks": state.rate_ticks + 1,
    }
    if n >= scaling.max:
        return decide(Direction.HOLD, Reason.AT_MAX, **acc)
    if state.stalled:
        return decide(Direction.HOLD, Reason.STEP_DID_NOT_HELP, **acc)
    if now - since < k.up_after:
        return decide(Direction.HOLD, Reason.SATURATION_BRIEF, **acc)
    rate = acc["rate_sum"] / acc["rate_ticks"]
    before = state.rate_before_step
    if before is not None and n > 1:
        ideal = before / (n - 1)
        if rate - before < MIN_GAIN_OF_IDEAL * ideal:
            return decide(
                Direction.HOLD, Reason.STEP_DID_NOT_HELP, stalled=True, rate_before_step=None, **acc
            )
    busy = host.busy
    if busy is not None and busy > k.host_cpu_max:
        return decide(Direction.HOLD, Reason.NO_HOST_HEADROOM, **acc)
    return decide(
        Direction.UP,
        Reason.SATURATED,
        saturated_since=None,
        low_since=None,
        rate_sum=0.0,
        rate_ticks=0,
        last_step_at=now,
        rate_before_step=rate,
    )


def _update_readings(
    previous: dict[int, Reading], workers: tuple[WorkerSample, ...]
) -> dict[int, Reading]:
    """Difference each worker's counters against its last reading of the same process."""
    out: dict[int, Reading] = {}
    for w in workers:
        if (
            w.pid is None
            or not w.ready
            or w.at is None
            or w.busy_seconds is None
            or w.handled is None
        ):
            continue  # no live, ready, reporting process: unknown, and nothing to keep
        prev = previous.get(w.index)
        fresh = Reading(w.pid, w.at, w.busy_seconds, w.handled)
        if prev is None or prev.pid != w.pid or w.busy_seconds < prev.busy_seconds:
            out[w.index] = fresh  # a new process: this is its baseline, not a measurement
            continue
        dt = w.at - prev.at
        if dt <= 0:
            out[w.index] = prev  # no heartbeat since the last tick: the last load still holds
            continue
        busy = (w.busy_seconds - prev.busy_seconds) / (dt * max(1, w.concurrency))
        load = max(_unit(busy), _unit(w.cpu or 0.0), _unit(w.window_full))
        rate = max(0.0, (w.handled - prev.handled) / dt)
        out[w.index] = replace(fresh, load=load, rate=rate)
    return out


def _measure(
    workers: tuple[WorkerSample, ...],
    readings: dict[int, Reading],
    host: HostSample,
    scaling: Scaling,
) -> Measures:
    loads = []
    rate = 0.0
    for w in workers:
        r = readings.get(w.index)
        if r is not None and r.load is not None:
            loads.append(r.load)
            rate += r.rate
    high = scaling.knobs.busy_high
    return Measures(
        workers=len(workers),
        measured=len(loads),
        load=sum(loads) / len(loads) if loads else None,
        total=sum(loads),
        saturated=sum(1 for x in loads if x >= high),
        rate=rate if loads else None,
        host_cpu=host.busy,
    )


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x))


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)
