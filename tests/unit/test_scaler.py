"""Tests for routemqd.scaler: the autoscaling policy on a fake clock with a simulated pool.

The simulated pool follows what the broker does with a shared subscription: every member gets the
same share of the arrivals (round robin, blind to speed), a member busy for ``cost`` seconds per
message can finish at most ``1/cost`` per second, and a new member is ready one tick after it was
started. No broker, no fork: the policy alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import pytest

from routemqd.manifest import Scaling, ScalingKnobs
from routemqd.scaler import (
    Decision,
    Direction,
    HostSample,
    PoolState,
    Reason,
    WorkerSample,
    initial_state,
    should_log,
    tick,
)

KNOBS = ScalingKnobs(up_after=5.0, down_after=60.0, busy_high=0.8, busy_low=0.5, host_cpu_max=0.85)
IDLE_HOST = HostSample(cpu=0.2, cpus=2)
BUSY_HOST = HostSample(cpu=0.97, cpus=2)


@dataclass
class FakeWorker:
    index: int
    pid: int
    started: float
    busy: float = 0.0
    handled: float = 0.0
    backlog: float = 0.0  # messages queued in this member's own session
    cpu: float = 0.0


@dataclass
class FakePool:
    """A pool of simulated workers, resized to whatever the scaler decides."""

    scaling: Scaling
    cost: float = 0.002  # handler seconds per message
    cpu_per_message: float = 0.0001
    host: HostSample = IDLE_HOST
    now: float = 0.0
    next_pid: int = 100
    workers: list[FakeWorker] = field(default_factory=list)
    state: PoolState = field(init=False)
    decisions: list[tuple[float, Decision]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = initial_state(self.scaling)
        self.resize(self.state.desired)

    def resize(self, n: int) -> None:
        while len(self.workers) < n:
            self.workers.append(FakeWorker(len(self.workers), self.next_pid, self.now))
            self.next_pid += 1
        del self.workers[n:]  # retire the highest indices

    def samples(self) -> tuple[WorkerSample, ...]:
        return tuple(
            WorkerSample(
                index=w.index,
                pid=w.pid,
                ready=self.now - w.started >= 1.0,
                at=self.now,
                busy_seconds=w.busy,
                handled=w.handled,
                cpu=w.cpu,
            )
            for w in self.workers
        )

    def run(self, seconds: float, rate: float) -> None:
        """Advance one second at a time at ``rate`` messages per second, then tick the scaler."""
        end = self.now + seconds
        while self.now < end:
            self.now += 1.0
            ready = [w for w in self.workers if self.now - w.started >= 1.0]
            for w in ready:
                offered = w.backlog + rate / len(ready)
                done = min(offered, 1.0 / self.cost)
                w.backlog = offered - done
                w.busy += done * self.cost
                w.handled += done
                w.cpu = min(1.0, done * self.cpu_per_message)
            self.step()

    def step(self) -> Decision:
        self.state, decision = tick(self.state, self.samples(), self.host, self.scaling, self.now)
        self.decisions.append((self.now, decision))
        self.resize(decision.desired)
        return decision

    def steps(self) -> list[tuple[float, Direction, int]]:
        return [
            (t, d.direction, d.desired)
            for t, d in self.decisions
            if d.direction is not Direction.HOLD
        ]

    @property
    def size(self) -> int:
        return len(self.workers)


def pool(lo: int = 1, hi: int = 4, **kw: object) -> FakePool:
    return FakePool(Scaling(min=lo, max=hi, knobs=KNOBS), **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- steady load


def test_steady_low_load_holds_at_min() -> None:
    p = pool()
    p.run(600, rate=50)  # 50 msg/s x 2 ms = 10 % of one worker
    assert p.size == 1
    assert p.steps() == []
    assert p.decisions[-1][1].reason is Reason.AT_MIN


def test_no_load_at_all_holds_at_min() -> None:
    p = pool(lo=2)
    p.run(300, rate=0)
    assert p.size == 2 and p.steps() == []


# ------------------------------------------------------------------------------- scaling up


def test_a_load_step_grows_one_step_at_a_time_until_it_keeps_up() -> None:
    p = pool(hi=8)
    p.run(30, rate=50)
    p.run(120, rate=1200)  # 2.4 workers' worth at 2 ms per message
    ups = [s for s in p.steps() if s[1] is Direction.UP]
    assert [n for _, _, n in ups] == [2, 3, 4]  # 4 x 300 msg/s = 60 % each: keeps up
    assert p.size == 4
    times = [t for t, _, _ in ups]
    # Each step waits for the new worker to be ready and measured, then up_after again.
    assert all(b - a >= KNOBS.up_after + 1 for a, b in itertools.pairwise(times))
    assert times[0] - 30 <= KNOBS.up_after + 2  # and the first one comes fast


def test_growth_never_exceeds_max() -> None:
    p = pool(hi=3)
    p.run(300, rate=5000)  # far more than 3 workers can take
    assert max(n for _, _, n in p.steps()) == 3
    assert p.size == 3
    assert p.decisions[-1][1].reason is Reason.AT_MAX


def test_brief_saturation_does_not_scale() -> None:
    p = pool()
    for _ in range(20):
        p.run(2, rate=1000)  # a burst: saturated (with its backlog drained) under up_after ...
        p.run(10, rate=50)  # ... then quiet again
    assert p.steps() == []
    assert any(d.reason is Reason.SATURATION_BRIEF for _, d in p.decisions)


def test_no_growth_without_host_headroom() -> None:
    p = pool(hi=8, host=BUSY_HOST)
    p.run(300, rate=2000)
    assert p.size == 1 and p.steps() == []
    assert p.decisions[-1][1].reason is Reason.NO_HOST_HEADROOM


def test_growth_resumes_when_the_host_has_headroom_again() -> None:
    p = pool(hi=8, host=BUSY_HOST)
    p.run(60, rate=1200)
    p.host = IDLE_HOST
    p.run(60, rate=1200)
    assert p.size == 4


def test_host_cpu_max_of_100_percent_never_blocks() -> None:
    knobs = replace(KNOBS, host_cpu_max=1.0)
    p = FakePool(Scaling(1, 4, knobs), host=HostSample(cpu=1.0, cpus=2))
    p.run(120, rate=1200)
    assert p.size == 4


def test_load_average_is_the_fallback_for_host_cpu() -> None:
    p = pool(hi=8, host=HostSample(cpu=None, load1=3.8, cpus=2))
    p.run(120, rate=1200)
    assert p.size == 1
    p.host = HostSample(cpu=None, load1=0.4, cpus=2)
    p.run(120, rate=1200)
    assert p.size == 4


def test_a_cpu_bound_pool_is_measured_by_its_cpu_too() -> None:
    # A handler that costs little wall time per call but keeps the worker's core busy.
    p = pool(hi=4, cost=0.0004, cpu_per_message=0.0009)
    p.run(60, rate=1500)  # 60 % busy, but 100 % of a core
    assert p.size > 1


def test_a_full_in_flight_window_counts_as_saturated() -> None:
    scaling = Scaling(1, 4, KNOBS)
    state = initial_state(scaling)
    decision = None
    for t in range(12):
        sample = WorkerSample(0, 7, True, at=float(t), busy_seconds=0.1 * t, handled=10.0 * t)
        sample = replace(sample, window_full=1.0)
        state, decision = tick(state, (sample,), IDLE_HOST, scaling, float(t))
        if decision.direction is Direction.UP:
            break
    assert decision is not None and decision.direction is Direction.UP


def test_concurrency_divides_the_busy_time() -> None:
    scaling = Scaling(1, 4, KNOBS)
    state = initial_state(scaling)
    for t in range(30):
        # 4 runners, 2 s of handler time per second: half busy, not saturated
        sample = WorkerSample(0, 7, True, float(t), 2.0 * t, 100.0 * t, cpu=0.1, concurrency=4)
        state, decision = tick(state, (sample,), IDLE_HOST, scaling, float(t))
        assert decision.direction is Direction.HOLD
    assert decision.measures.load == pytest.approx(0.5)


# ------------------------------------------------------------------------ only what helps


def test_a_step_that_did_not_raise_throughput_stops_growth() -> None:
    scaling = Scaling(1, 8, KNOBS)
    state = initial_state(scaling)
    n = 1
    pids = {0: 10}
    counters: dict[int, tuple[float, float]] = {}
    ups = []
    for t in range(1, 200):
        # a downstream bottleneck: the pool finishes 400 msg/s however many workers it has,
        # and every worker is busy all the time waiting for it
        samples = []
        for i in range(n):
            busy, handled = counters.get(i, (0.0, 0.0))
            counters[i] = (busy + 1.0, handled + 400.0 / n)
            samples.append(
                WorkerSample(i, pids.setdefault(i, 10 + i), True, float(t), *counters[i])
            )
        state, decision = tick(state, tuple(samples), IDLE_HOST, scaling, float(t))
        if decision.direction is Direction.UP:
            ups.append(t)
        n = decision.desired
    assert n == 2 and len(ups) == 1
    assert state.last is not None and state.last.reason is Reason.STEP_DID_NOT_HELP


def test_a_stall_ends_when_the_pool_is_no_longer_saturated() -> None:
    state = PoolState(desired=2, stalled=True)
    scaling = Scaling(1, 8, KNOBS)
    busy = 0.0
    for t in range(10):
        busy += 1.0 if t < 5 else 0.6
        samples = tuple(WorkerSample(i, 10 + i, True, float(t), busy, 100.0 * t) for i in range(2))
        state, d = tick(state, samples, IDLE_HOST, scaling, float(t))
        if t == 4:
            assert d.reason is Reason.STEP_DID_NOT_HELP and state.stalled
    assert d.reason is Reason.STEADY and not state.stalled


# ---------------------------------------------------------------- one member's backlog


def test_one_busy_member_with_idle_others_does_not_grow_the_pool() -> None:
    p = pool(lo=3, hi=8)
    p.run(5, rate=300)
    p.workers[1].backlog = 100_000  # a session that collected messages while its worker was away
    p.run(120, rate=300)
    assert p.size == 3 and p.steps() == []


def test_two_members_one_with_a_backlog_do_not_grow() -> None:
    p = pool(lo=2, hi=8)
    p.run(5, rate=300)
    p.workers[0].backlog = 100_000
    p.run(120, rate=300)  # member 0: 100 %, member 1: 30 % -> mean 65 %: not saturated
    assert p.size == 2 and p.steps() == []


def test_a_backlogged_member_next_to_busy_ones_is_reported_as_such() -> None:
    scaling = Scaling(1, 8, KNOBS)
    state = PoolState(desired=4)
    loads = (1.0, 1.0, 0.7, 0.7)  # mean 85 %, but only half the members saturated
    for t in range(30):
        samples = tuple(
            WorkerSample(i, 10 + i, True, float(t), x * t, 100.0 * t) for i, x in enumerate(loads)
        )
        state, d = tick(state, samples, IDLE_HOST, scaling, float(t))
        assert d.direction is Direction.HOLD
    assert d.reason is Reason.ONE_MEMBER_BUSY


# ------------------------------------------------------------------------------- scaling down


def test_cool_down_before_shrinking_then_one_step_per_cool_down() -> None:
    p = pool(hi=4)
    p.run(120, rate=1200)
    assert p.size == 4
    stop = p.now
    p.run(30, rate=0)
    assert p.size == 4  # silence for less than down_after: nothing yet
    p.run(400, rate=0)
    downs = [t for t, d, _ in p.steps() if d is Direction.DOWN]
    assert len(downs) == 3 and p.size == 1
    assert downs[0] - stop >= KNOBS.down_after
    assert all(b - a >= KNOBS.down_after for a, b in itertools.pairwise(downs))


def test_shrinks_only_when_one_fewer_would_stay_below_the_low_water_mark() -> None:
    p = pool(hi=4)
    p.run(120, rate=1200)
    assert p.size == 4
    # 4 workers x 2 ms at 800 msg/s = 1.6 workers of work: 3 workers would be at 53 % > 50 %
    p.run(600, rate=800)
    assert p.size == 4
    # at 600 msg/s, 3 workers would be at 40 %: one fewer; 2 would be at 60 %: no further
    p.run(600, rate=600)
    assert p.size == 3


def test_hysteresis_prevents_flapping_on_a_load_near_the_threshold() -> None:
    # 1000 msg/s x 2 ms is two workers' worth: 2 workers are saturated, 3 are at 67 %. A policy
    # that shrank whenever the pool was below busy_high would go 3 -> 2 -> 3 forever; with the
    # low-water mark over n-1 workers it settles at 3 and stays there while the load wobbles.
    p = pool(hi=8)
    p.run(120, rate=1000)
    assert p.size == 3
    settled = len(p.steps())
    for _ in range(20):
        p.run(15, rate=900)
        p.run(15, rate=1100)
    assert p.steps()[settled:] == []
    assert p.size == 3


def test_never_below_min() -> None:
    p = pool(lo=2, hi=4)
    p.run(120, rate=1500)
    p.run(900, rate=0)
    assert p.size == 2
    assert min(n for _, _, n in p.steps()) == 2


def test_a_worker_without_measurements_is_not_counted_as_idle() -> None:
    scaling = Scaling(1, 4, KNOBS)
    state = PoolState(desired=3)
    reasons = set()
    for t in range(300):
        samples = (
            WorkerSample(0, 10, True, float(t), 0.01 * t, 5.0 * t),
            WorkerSample(1, 11, True, float(t), 0.01 * t, 5.0 * t),
            WorkerSample(2, 12, False),  # just started: no heartbeat with counters yet
        )
        state, d = tick(state, samples, IDLE_HOST, scaling, float(t))
        assert d.direction is Direction.HOLD
        reasons.add(d.reason)
    assert reasons == {Reason.MEASURING}


def test_a_restarted_worker_starts_a_new_series_and_the_low_clock_restarts() -> None:
    scaling = Scaling(1, 4, KNOBS)
    state = PoolState(desired=2)

    def samples(t: float, pid1: int, base: float = 0.0) -> tuple[WorkerSample, ...]:
        return (
            WorkerSample(0, 10, True, t, 0.01 * t, 5.0 * t),
            WorkerSample(1, pid1, True, t, 0.01 * (t - base), 5.0 * (t - base)),
        )

    for t in range(50):
        state, d = tick(state, samples(float(t), 11), IDLE_HOST, scaling, float(t))
    assert d.reason is Reason.COOLING_DOWN
    state, d = tick(state, samples(50.0, 99, base=50.0), IDLE_HOST, scaling, 50.0)
    assert d.reason is Reason.MEASURING and state.low_since is None
    for t in range(51, 51 + 59):
        state, d = tick(state, samples(float(t), 99, base=50.0), IDLE_HOST, scaling, float(t))
        assert d.direction is Direction.HOLD  # the 60 s of low load count from the new baseline
    state, d = tick(state, samples(111.0, 99, base=50.0), IDLE_HOST, scaling, 111.0)
    assert d.direction is Direction.DOWN


# ------------------------------------------------------------------------------- bounds


def test_max_lowered_gives_an_immediate_retire_target() -> None:
    p = pool(hi=8)
    p.run(120, rate=1200)
    assert p.size == 4
    p.scaling = Scaling(1, 2, KNOBS)
    d = p.step()
    assert (d.direction, d.reason, d.previous, d.desired) == (
        Direction.DOWN,
        Reason.ABOVE_MAX,
        4,
        2,
    )
    assert p.size == 2


def test_min_raised_grows_at_once_even_without_headroom() -> None:
    p = pool(host=BUSY_HOST)
    p.run(10, rate=0)
    p.scaling = Scaling(3, 4, KNOBS)
    d = p.step()
    assert (d.direction, d.reason, d.desired) == (Direction.UP, Reason.BELOW_MIN, 3)


def test_bounds_act_before_measurements_exist() -> None:
    scaling = Scaling(1, 2, KNOBS)
    _state, d = tick(PoolState(desired=5), (), IDLE_HOST, scaling, 0.0)
    assert (d.direction, d.desired) == (Direction.DOWN, 2)


def test_holds_while_the_slots_do_not_match_the_last_decision() -> None:
    scaling = Scaling(1, 4, KNOBS)
    samples = (WorkerSample(0, 10, True, 1.0, 1.0, 100.0),)
    _state, d = tick(PoolState(desired=2), samples, IDLE_HOST, scaling, 1.0)
    assert (d.direction, d.reason) == (Direction.HOLD, Reason.RESIZING)


def test_a_heartbeat_that_did_not_advance_keeps_the_last_load() -> None:
    scaling = Scaling(1, 4, KNOBS)
    state = initial_state(scaling)
    state, _ = tick(state, (WorkerSample(0, 10, True, 1.0, 0.0, 0.0),), IDLE_HOST, scaling, 1.0)
    state, d = tick(state, (WorkerSample(0, 10, True, 2.0, 0.3, 100.0),), IDLE_HOST, scaling, 2.0)
    assert d.measures.load == pytest.approx(0.3)
    state, d = tick(state, (WorkerSample(0, 10, True, 2.0, 0.3, 100.0),), IDLE_HOST, scaling, 3.0)
    assert d.measures.load == pytest.approx(0.3) and d.measures.rate == pytest.approx(100.0)


# ------------------------------------------------------------------------------- reporting


def test_log_fields_carry_the_numbers_that_decided() -> None:
    p = pool()
    p.run(30, rate=1200)
    _t, up = next((t, d) for t, d in p.decisions if d.direction is Direction.UP)
    fields = up.log_fields()
    assert fields["direction"] == "up" and fields["reason"] == "saturated"
    assert (fields["previous"], fields["desired"]) == (1, 2)
    assert fields["load"] == pytest.approx(1.0)
    assert fields["saturated"] == 1 and fields["measured"] == 1 and fields["workers"] == 1
    assert fields["rate"] == pytest.approx(500.0)
    assert fields["host_cpu"] == pytest.approx(0.2)


def test_should_log_every_step_and_a_notable_hold_once() -> None:
    p = pool(host=BUSY_HOST)
    p.run(60, rate=2000)
    logged = [
        d
        for (_, prev), (_, d) in zip(p.decisions, p.decisions[1:], strict=False)
        if should_log(prev, d)
    ]
    assert [d.reason for d in logged] == [Reason.NO_HOST_HEADROOM]
    p.host = IDLE_HOST
    before = len(p.decisions)
    p.run(20, rate=2000)
    new = p.decisions[before - 1 :]
    logged = [d for (_, prev), (_, d) in itertools.pairwise(new) if should_log(prev, d)]
    assert [d.direction for d in logged][:1] == [Direction.UP]


def test_initial_state_starts_at_min_or_from_what_runs() -> None:
    scaling = Scaling(2, 5, KNOBS)
    assert initial_state(scaling).desired == 2
    assert [initial_state(scaling, n).desired for n in (1, 3, 9)] == [2, 3, 5]
