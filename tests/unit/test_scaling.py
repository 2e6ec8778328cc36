"""The master's scaling pass on fakes: samples from heartbeats, steps through the slot table's
add() and retire(), the pool_scaled event, status and metrics, and reloads that keep a grown pool.

No fork and no broker: the slot table runs on :mod:`tests.unit.fakes`, the host's CPU is a
number the test sets, and the workers' heartbeats are played by the test.
"""

from __future__ import annotations

import selectors
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from routemqd.manifest import load
from routemqd.master import Master
from routemqd.metrics import render
from routemqd.plan import slots_for
from routemqd.protocol import StopMode
from routemqd.scaler import Direction, HostSample, Reason
from routemqd.scaling import Autoscaler, members, ready_by_pool, sample_host, worker_sample
from routemqd.slots import State
from tests.unit.fakes import Clock, Harness, exited, manifest

FAST = {"up_after": "1s", "down_after": "3s"}


def auto_route(lo: int = 1, hi: int = 3, **kw: Any) -> dict[str, Any]:
    return {
        "name": "r",
        "topic": "r/{n}",
        "handler": "m:f",
        "shared": True,
        "workers": {"min": lo, "max": hi},
        "scaling": FAST,
        **kw,
    }


class Host:
    """A host sampler whose CPU the test sets."""

    def __init__(self, cpu: float = 0.1) -> None:
        self.cpu = cpu
        self.calls = 0

    def __call__(self) -> HostSample:
        self.calls += 1
        return HostSample(cpu=self.cpu, load1=None, cpus=2)


class Pool:
    """A slot table with an autoscaled pool, workers that beat like real ones, and the pass."""

    def __init__(self, lo: int = 1, hi: int = 3, routes: list[dict[str, Any]] | None = None):
        self.h = Harness(manifest(routes or [auto_route(lo, hi)]))
        self.host = Host()
        self.scaler = Autoscaler(self.h.table, self.host)
        self.busy: dict[int, float] = {}  # pid -> cumulative busy seconds
        self.handled: dict[int, float] = {}

    def ready_all(self) -> None:
        """Fork whatever is STARTING and let every new worker report ready."""
        self.h.reconcile()
        for slot in self.h.table.slots.values():
            if slot.proc is not None and slot.proc.ready_at is None and not slot.retiring:
                self.h.ready(slot.proc)

    def beat(self, load: float, dt: float = 1.0, window_full: bool = False) -> None:
        """Every live worker was busy ``load`` of the last ``dt`` seconds, at 100 msg/s busy."""
        self.h.clock.advance(dt)
        for slot in list(self.h.table.slots.values()):
            proc = slot.proc
            if proc is None or proc.ready_at is None:
                continue
            self.busy[proc.pid] = self.busy.get(proc.pid, 0.0) + load * dt
            self.handled[proc.pid] = self.handled.get(proc.pid, 0.0) + 100 * load * dt
            self.h.event(
                proc,
                "hb",
                busy_seconds=self.busy[proc.pid],
                handled=self.handled[proc.pid],
                window_full=window_full,
            )

    def run(self) -> bool:
        return self.scaler.run(self.h.manifest, self.h.now)

    def passes(self, n: int, load: float, start: bool = False) -> None:
        """``n`` seconds at ``load``, a scaling pass after each; ``start``: new slots get ready."""
        for _ in range(n):
            self.beat(load)
            self.run()
            if start:
                self.ready_all()

    def size(self) -> int:
        return len(members(self.h.table.slots.values()).get("r", []))

    def states(self) -> dict[int, State]:
        return {k[1]: s.state for k, s in self.h.table.slots.items() if k[0] == "r"}


# ---------------------------------------------------------------------------------- samples


def test_a_slot_without_a_worker_is_unmeasured() -> None:
    h = Harness(manifest([auto_route()]))
    w = worker_sample(h.slot())
    assert (w.index, w.pid, w.ready, w.busy_seconds) == (0, None, False, None)


def test_a_sample_carries_the_last_heartbeat_and_psutil_cpu() -> None:
    h = Harness(manifest([auto_route(concurrency=4)]))
    proc = h.start_ready()
    h.clock.advance(1)
    h.event(proc, "hb", busy_seconds=0.5, handled=40, window_full=True, unacked=20)
    proc.cpu = 37.0
    w = worker_sample(h.slot())
    assert (w.pid, w.ready, w.at) == (proc.pid, True, h.now)
    assert (w.busy_seconds, w.handled, w.window_full) == (0.5, 40.0, 1.0)
    assert w.cpu == pytest.approx(0.37) and w.concurrency == 4


def test_a_worker_before_the_new_heartbeat_fields_counts_as_unmeasured() -> None:
    h = Harness(manifest([auto_route()]))
    proc = h.start_ready()
    h.event(proc, "hb", handled=3, duration_sum=0.1)
    w = worker_sample(h.slot())
    assert w.busy_seconds is None and w.window_full == 0.0


def test_a_stopping_worker_is_not_ready() -> None:
    h = Harness(manifest([auto_route()]))
    proc = h.start_ready()
    proc.stop_mode = StopMode.RETIRE
    assert not worker_sample(h.slot()).ready
    assert ready_by_pool(h.table.slots.values()) == {}


def test_the_host_sample_is_a_fraction_of_all_cores() -> None:
    host = sample_host()
    assert host.cpu is not None and 0.0 <= host.cpu <= 1.0 and host.cpus >= 1


# ------------------------------------------------------------------------------------ steps


def test_sustained_saturation_adds_one_slot_through_the_table() -> None:
    p = Pool()
    p.ready_all()
    p.run()  # first reading: a baseline
    with capture_logs() as logs:
        p.passes(3, 0.95)
    assert p.size() == 2
    assert p.states() == {0: State.READY, 1: State.STARTING}
    (step,) = [e for e in logs if e["event"] == "pool_scaled"]
    assert step["pool"] == "r" and step["direction"] == Direction.UP.value
    assert (step["previous"], step["desired"], step["reason"]) == (1, 2, "saturated")
    assert step["load"] == pytest.approx(0.95) and step["host_cpu"] == pytest.approx(0.1)


def test_growth_waits_for_the_new_worker_and_never_passes_max() -> None:
    p = Pool(hi=3)
    p.ready_all()
    p.passes(40, 1.0, start=True)
    assert p.size() == 3
    assert p.scaler.states["r"].last.reason is Reason.AT_MAX
    assert p.h.procs.spawned[-1].spec.index == 2 and len(p.h.procs.spawned) == 3


def test_no_step_on_a_saturated_host_and_the_hold_is_logged_once() -> None:
    p = Pool()
    p.host.cpu = 0.99
    p.ready_all()
    with capture_logs() as logs:
        p.passes(6, 1.0)
    assert p.size() == 1
    holds = [e for e in logs if e["event"] == "pool_scaled"]
    assert [(e["direction"], e["reason"]) for e in holds] == [("hold", "no_host_headroom")]


def test_a_pool_with_a_parked_slot_holds() -> None:
    p = Pool(lo=2, hi=4)
    p.ready_all()
    p.h.exit(p.h.slot("r", 1).proc, exited(3))  # a boot failure: parked in failed
    assert p.h.slot("r", 1).state is State.FAILED
    p.passes(5, 1.0)
    assert p.size() == 2
    assert p.scaler.states["r"].last.reason is Reason.MEASURING


def test_silence_retires_the_highest_slot_which_then_leaves_the_table() -> None:
    p = Pool(lo=1, hi=3)
    p.passes(20, 1.0, start=True)  # grow to 3
    assert p.size() == 3
    with capture_logs() as logs:
        p.passes(6, 0.0)
    assert p.size() == 2
    retiring = p.h.table.slots[("r", 2)]
    assert retiring.state is State.RETIRING
    downs = [e for e in logs if e["event"] == "pool_scaled"]
    assert [(e["direction"], e["reason"], e["desired"]) for e in downs] == [
        ("down", "underused", 2)
    ]
    p.h.reconcile()  # the retire path: stop in retire mode (unsubscribe, drain, end session)
    proc = retiring.proc
    assert p.h.procs.sent(proc)[-1] == ("stop", {"mode": StopMode.RETIRE})
    p.h.retired(proc)
    assert ("r", 2) not in p.h.table.slots and retiring.state is State.GONE


def test_the_pool_never_shrinks_below_min() -> None:
    p = Pool(lo=2, hi=3)
    p.ready_all()
    p.passes(20, 0.0)
    assert p.size() == 2 and p.scaler.states["r"].last.reason is Reason.AT_MIN


def test_a_slot_coming_back_waits_for_its_retiring_predecessor() -> None:
    p = Pool(lo=1, hi=2)
    p.passes(10, 1.0, start=True)
    assert p.size() == 2
    p.passes(6, 0.0)
    old = p.h.table.slots[("r", 1)]
    assert old.state is State.RETIRING
    p.h.reconcile()
    for _ in range(10):  # busy again before the retiring worker has exited
        p.beat(1.0)
        p.run()
        p.h.reconcile()
    new = p.h.table.slots[("r", 1)]
    assert new is not old and new.proc is None, "never two live clients on one client id"
    p.h.exit(old.proc, exited(0))
    p.h.reconcile()
    assert new.proc is not None


def test_fixed_pools_are_left_alone() -> None:
    p = Pool(
        routes=[{"name": "r", "topic": "r/{n}", "handler": "m:f", "shared": True, "workers": 2}]
    )
    p.ready_all()
    for _ in range(10):
        p.beat(1.0)
        assert not p.run()
    assert p.size() == 2 and p.scaler.states == {} and p.host.calls == 0


def test_running_counts_are_the_targets_or_the_slots_that_stay() -> None:
    p = Pool(
        routes=[
            auto_route(),
            {"name": "f", "topic": "f/{n}", "handler": "m:f", "shared": True, "workers": 3},
        ]
    )
    assert p.scaler.running() == {"r": 1, "f": 3}
    p.passes(5, 1.0, start=True)
    assert p.scaler.running()["r"] == p.scaler.states["r"].desired >= 2


def test_views_show_min_max_desired_actual_and_the_reason() -> None:
    p = Pool(hi=4)
    p.ready_all()
    p.passes(3, 1.0)
    (view,) = p.scaler.views(p.h.manifest)
    assert (view.min, view.max, view.desired, view.actual) == (1, 4, 2, 1)
    assert view.autoscaled and view.reason == "saturated" and view.load == pytest.approx(1.0)


# ------------------------------------------------------------------------- in the master


def write(path: Path, workers: Any, graceful: float = 5, **route: Any) -> Path:
    doc = {
        "routes": [
            {
                "name": "r",
                "topic": "r/{n}",
                "handler": "m:f",
                "shared": True,
                "workers": workers,
                "scaling": FAST,
                **route,
            }
        ],
        "supervisor": {"health_interval": 0.2, "graceful_timeout": graceful},
        "control": {"socket": str(path.parent / "c.sock")},
    }
    if not isinstance(workers, dict):
        del doc["routes"][0]["scaling"]
    path.write_text(yaml.safe_dump(doc))
    return path


class FakeOs:
    def __init__(self) -> None:
        self.next_pid = 5_000_000

    def fork(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def waitpid(self, pid: int, flags: int) -> tuple[int, int]:
        return 0, 0

    def kill(self, pid: int, sig: int) -> None:
        pass


@pytest.fixture
def master(tmp_path: Path) -> Any:
    path = write(tmp_path / "m.yaml", {"min": 1, "max": 4})
    clock = Clock()
    host = Host()
    m = Master(load(str(path)), clock=clock, ops=FakeOs(), host=host)
    m.notifier = m.readiness.notifier = _Quiet()
    m.fake_clock, m.fake_host, m.path = clock, host, path
    yield m
    m.sel.close()


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *a: None


def grow(m: Any, to: int) -> None:
    """Saturate every worker until the pool has ``to`` ready slots."""
    busy: dict[int, float] = {}
    for _ in range(60):
        m.manage(m.clock())
        for slot in list(m.slots.values()):
            proc = slot.proc
            if proc is None or slot.retiring:
                continue
            if proc.ready_at is None:
                m.table.on_event(proc, {"t": "ready"}, m.clock())
            busy[proc.pid] = busy.get(proc.pid, 0.0) + 1.0
            m.table.on_event(
                proc,
                {"t": "hb", "busy_seconds": busy[proc.pid], "handled": busy[proc.pid]},
                m.clock(),
            )
        if len([s for s in m.slots.values() if s.state is State.READY]) >= to:
            return
        m.fake_clock.advance(1.0)
        m.scale(m.clock())
    raise AssertionError(f"did not grow to {to}: {m.snapshot()['pools']}")


def _started(master: Any, to: int) -> None:
    for spec in slots_for(master.manifest).values():
        master.table.add(spec, master.clock())
    grow(master, to)


def pids(m: Any) -> dict[int, int]:
    return {k[1]: s.proc.pid for k, s in m.slots.items() if not s.retiring and s.proc}


def test_the_master_starts_an_autoscaled_pool_at_min_and_grows_it(master: Any) -> None:
    _started(master, 1)
    assert len(master.slots) == 1
    grow(master, 3)
    (pool,) = master.snapshot()["pools"]
    assert {k: pool[k] for k in ("route", "min", "max", "desired", "actual")} == {
        "route": "r",
        "min": 1,
        "max": 4,
        "desired": 3,
        "actual": 3,
    }
    text = render(master)
    assert text.count("# TYPE routemqd_workers_desired gauge") == 1
    assert 'routemqd_workers_desired{route="r"} 3' in text
    assert 'routemqd_workers_max{route="r"} 4' in text


def test_no_scaling_while_the_daemon_stops(master: Any) -> None:
    _started(master, 1)
    calls = master.fake_host.calls
    master.begin_shutdown("SIGTERM")
    master.scale(master.clock())
    assert master.fake_host.calls == calls


def test_an_unrelated_reload_keeps_a_grown_pool(master: Any) -> None:
    _started(master, 3)
    before = pids(master)
    write(master.path, {"min": 1, "max": 4}, graceful=7)
    master.reload()
    assert master.last_reload["ok"]
    assert pids(master) == before
    assert not any(s.retiring or s.replace_reason for s in master.slots.values())


def test_a_reload_lowering_max_retires_down_to_it_keeping_the_rest(master: Any) -> None:
    _started(master, 4)
    before = pids(master)
    write(master.path, {"min": 1, "max": 2})
    master.reload()
    assert pids(master) == {0: before[0], 1: before[1]}
    assert {k[1] for k, s in master.slots.items() if s.state is State.RETIRING} == {2, 3}
    with capture_logs() as logs:
        master.fake_clock.advance(1)
        master.scale(master.clock())
    (event,) = [e for e in logs if e["event"] == "pool_scaled"]
    assert (event["direction"], event["reason"], event["desired"]) == ("down", "above_max", 2)
    assert master.snapshot()["pools"][0]["desired"] == 2


def test_a_reload_raising_min_grows_the_pool(master: Any) -> None:
    _started(master, 2)
    write(master.path, {"min": 3, "max": 4})
    master.reload()
    master.scale(master.clock())
    assert len(pids(master)) == 2 and len(members(master.slots.values())["r"]) == 3
    assert master.autoscaler.states["r"].desired == 3


def test_range_to_number_and_back_keeps_the_slots_that_stay(master: Any) -> None:
    _started(master, 3)
    before = pids(master)
    write(master.path, 2)
    master.reload()
    assert pids(master) == {0: before[0], 1: before[1]}
    master.scale(master.clock())
    assert "r" not in master.autoscaler.states
    write(master.path, {"min": 1, "max": 4})
    master.reload()
    master.scale(master.clock())
    assert pids(master) == {0: before[0], 1: before[1]}
    assert master.autoscaler.states["r"].desired == 2, "a fixed pool turned range keeps its size"


def test_metrics_and_status_of_a_fixed_pool(tmp_path: Path) -> None:
    path = write(tmp_path / "f.yaml", 2)
    m = Master(load(str(path)), clock=Clock(), ops=FakeOs(), host=Host())
    try:
        m.sel.register(m._sig_r, selectors.EVENT_READ, "signals")
        (pool,) = m.snapshot()["pools"]
        assert (pool["autoscaled"], pool["min"], pool["max"], pool["desired"]) == (False, 2, 2, 2)
    finally:
        m.sel.close()
