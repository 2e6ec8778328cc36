"""routemqd benchmarks against plain paho-mqtt consumer processes (``make bench``).

One command: starts its own mosquitto (``etc/mosquitto.conf`` on a free loopback port), runs every
case, repeats it, prints a table of medians next to the targets, and writes
``bench/results/results.json``, ``throughput.png``, ``recovery.png`` and ``README.md``.

Cases (100-byte payloads from ``bench/publisher.py`` for every consumer):

- throughput, a handler that counts and stamps the time of each message (what the baseline's
  ``on_message`` does): QoS 0/1 x MQTT 5/3.1.1 x 1/2/4 workers, routemqd against the same
  number of ``bench/consumer.py`` processes (paho, handler inline in ``on_message``). ``backlog``:
  QoS 1 messages queued in the slots' persistent sessions while the consumers were down, drained
  after they start (per worker: messages / its ready to its last message, summed). ``live``:
  consumers running, the publisher sends as fast as it can (msgs/s from the first publish to the
  last message handled). A routemqd worker leaves its count and last time in a file from its
  ``teardown`` hook when it stops; heartbeats only tell when a run is over.
- latency at 2,000 msg/s QoS 1, 2 workers: publish (``time.time_ns()`` in the payload) to handler
  start; the baseline records the same thing in ``on_message``.
- handler cost: one shared worker, concurrency 1 and 8, a 1 ms CPU handler, a 10 ms
  ``time.sleep`` handler and its ``asyncio.sleep`` variant: msgs/s against the ideal.
- recovery: SIGKILL a worker, time until the master logs its replacement ready; 100 msg/s QoS 1
  during the kills, every id counted by a ledger handler.
- reload: a 4-slot route under 1,000 msg/s, handler changed, SIGHUP: time until all new workers
  are ready, longest gap between two handled messages, messages lost.
- master cost: idle CPU and memory of the master with 8, 32 and 64 slots, time to all ready, and
  per-worker memory.
- autoscale: a 2 ms handler, 50 msg/s then a step to 1,200 msg/s for 30 s, then silence, for a
  pool of ``{min: 1, max: 4}`` against fixed pools of 1 and 4: time until the backlog stops
  growing and messages per CPU-second (``bench/autoscale.py``; skipped until the daemon reports
  pool sizes).

``--quick`` is a smoke run of about a minute; ``--repeat N`` sets the repeats of a full run
(default 5: a median of fewer moves with whatever else the shared machine is doing).
Targets that are missed are marked MISS; the run never fails because of a miss.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402

from bench.autoscale import section_autoscale, summary_rows  # noqa: E402
from bench.infra import (  # noqa: E402
    Bench,
    BenchError,
    RouteDaemon,
    cpu_seconds,
    kill_worker,
    latencies_ms,
    ledger,
    longest_gap,
    percentile,
    poll_handled,
    proto_label,
    route,
    wait_ledger,
    wait_until,
    write_manifest,
)
from tests.support.broker import find_mosquitto  # noqa: E402
from tests.support.processes import stop_tracked  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
FULL_REPEATS = 5  # a full run's repeats of each case; medians over these
SETTLE_ROUTEMQD = 2.5  # QoS 0: no change for this long = done (counters move once a second)
SETTLE_BASELINE = 1.0  # QoS 0: baseline consumers report every 0.1 s

TARGETS = {
    "throughput_ratio": 1.0,
    "cpu_ratio": 1.0,  # worker CPU per message, routemqd / baseline
    "latency_p99_ratio": 1.2,
    "handler_efficiency": 0.95,  # 1 ms CPU handler: share of the ideal rate
    "latency_p50_ms": 2.0,
    "latency_p99_ms": 15.0,
    "kill_ready_p50_ms": 50.0,
    "kill_ready_p99_ms": 200.0,
    "master_cpu_pct": 1.0,
    "master_rss_mb": 40.0,
    "startup_64_s": 5.0,
}


@dataclass(frozen=True)
class Plan:
    quick: bool
    repeat: int
    workers: tuple[int, ...]
    protocols: tuple[int, ...]
    messages: dict[int, int]  # throughput messages per run, by worker count
    latency_rate: int
    latency_s: float
    handler_s: float
    concurrency: tuple[int, ...]
    kills: int
    kill_rate: float
    reload_rate: float
    reload_slots: int
    reload_load_s: float
    idle_s: float
    slot_counts: tuple[int, ...]
    sections: tuple[str, ...]


QUICK_NOTE = (
    "Quick run: the message counts are so small that a run lasts a fraction of a second, so "
    "its throughput numbers are a smoke test only.\n"
)

SECTIONS = ("throughput", "latency", "handlers", "recovery", "reload", "master", "autoscale")


def make_plan(args: argparse.Namespace) -> Plan:
    sections = tuple(args.only.split(",")) if args.only else SECTIONS
    for s in sections:
        if s not in SECTIONS:
            raise SystemExit(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        return Plan(
            quick=True,
            repeat=args.repeat or 1,
            workers=(2,),
            protocols=(5, 4),
            messages={1: 4000, 2: 6000, 4: 8000},
            latency_rate=2000,
            latency_s=2.0,
            handler_s=0.5,
            concurrency=(1, 8),
            kills=6,
            kill_rate=100,
            reload_rate=1000,
            reload_slots=4,
            reload_load_s=1.0,
            idle_s=1.0,
            slot_counts=(8, 32),
            sections=sections,
        )
    return Plan(
        quick=False,
        repeat=args.repeat or FULL_REPEATS,
        workers=(1, 2, 4),
        protocols=(5, 4),
        messages={1: 40000, 2: 60000, 4: 80000},
        latency_rate=2000,
        latency_s=10.0,
        handler_s=3.0,
        concurrency=(1, 8),
        kills=50,
        kill_rate=100,
        reload_rate=1000,
        reload_slots=4,
        reload_load_s=2.0,
        idle_s=10.0,
        slot_counts=(8, 32, 64),
        sections=sections,
    )


@dataclass
class Recorder:
    runs: list[dict[str, Any]] = field(default_factory=list)

    def run(self, key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        label = " ".join(f"{k}={v}" for k, v in key.items() if k != "case")
        started = time.monotonic()
        try:
            result = fn()
        except (BenchError, OSError, RuntimeError, ValueError) as e:
            result = {"error": f"{type(e).__name__}: {e}"[:3000]}
            traceback.print_exc(limit=3)
        result["elapsed_s"] = round(time.monotonic() - started, 2)
        self.runs.append({**key, **result})
        shown = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
        print(f"  [{key['case']}] {label}: {fmt_result(shown)}", flush=True)

    def select(self, **key: Any) -> list[dict[str, Any]]:
        return [
            r for r in self.runs if all(r.get(k) == v for k, v in key.items()) and "error" not in r
        ]


def fmt_result(result: dict[str, Any]) -> str:
    parts = []
    for k, v in result.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


# ------------------------------------------------------------------------------ throughput


def drain_timeout(n: int) -> float:
    return 60.0 + n / 1000.0


def read_stamps(rundir: Path) -> dict[int, tuple[int, float]]:
    """pid -> (messages, unix time of the last one), from the files the ``stamp`` handler's
    teardown left when the workers stopped. The baseline consumers count and stamp the same way
    in ``on_message``, so both systems are timed to the message."""
    out: dict[int, tuple[int, float]] = {}
    for path in rundir.glob("stamp-*.txt"):
        count, last = path.read_text().split()
        out[int(path.stem.split("-", 1)[1])] = (int(count), float(last))
    return out


def stamped(rundir: Path, n: int, what: str) -> dict[int, tuple[int, float]]:
    stamps = read_stamps(rundir)
    total = sum(c for c, _ in stamps.values())
    if total < n:
        raise BenchError(f"{what}: the workers' stamps count {total} of {n} messages")
    return stamps


STAMP = {"teardown": "write_stamp"}  # the handler and hook every throughput case runs


def rq_backlog(bench: Bench, protocol: int, workers: int, n: int) -> dict[str, Any]:
    tag, rundir = bench.rundir("tb")
    topic = f"bench/{tag}"
    manifest = write_manifest(
        rundir / "m.yaml", bench.port, protocol, [route(tag, topic, "stamp", workers, **STAMP)]
    )
    first = bench.daemon(manifest, rundir)
    first.wait_ready()
    bench.stop_daemon(first)  # SIGTERM: the sessions stay, the backlog is queued in them
    fill(bench, rundir, topic, n)
    d = bench.daemon(manifest, rundir)
    d.wait_ready()
    pids = d.worker_pids()
    cpu0, mcpu0 = cpu_seconds(pids), cpu_seconds([d.pid])
    trace = poll_handled(d, lambda tr: tr.total >= n, drain_timeout(n))
    cpu, mcpu = cpu_seconds(pids) - cpu0, cpu_seconds([d.pid]) - mcpu0
    ready = d.ready_times()
    t_ready = min(ready.values())
    bench.stop_daemon(d)
    stamps = stamped(rundir, n, "backlog")
    t_end = max(last for _, last in stamps.values())
    return {
        "rate": sum(c / (last - ready[pid]) for pid, (c, last) in stamps.items() if c),
        "rate_first_to_last": n / (t_end - t_ready),
        "e2e_s": t_end - d.spawned,
        "ready_s": t_ready - d.spawned,
        "handled": trace.total,
        "cpu_us": cpu / n * 1e6,
        "master_cpu_us": mcpu / n * 1e6,
    }


def base_backlog(bench: Bench, protocol: int, workers: int, n: int) -> dict[str, Any]:
    tag, rundir = bench.rundir("bb")
    topic = f"bench/{tag}"
    flt = f"$share/bench/{topic}" if workers > 1 else topic
    setup = bench.consumers(
        workers, bench.port, tag, flt, protocol, 1, rundir, setup=True, end_session=False
    )
    setup.wait_exit(60)
    bench.release(setup)
    fill(bench, rundir, topic, n)
    spawned = time.time()
    g = bench.consumers(workers, bench.port, tag, flt, protocol, 1, rundir)
    g.wait_subscribed(60)
    cpu0 = cpu_seconds(g.pids)
    wait_until(lambda: g.total >= n, drain_timeout(n), "baseline drain", every=0.02)
    cpu = cpu_seconds(g.pids) - cpu0
    t_end, t_ready, total, rate = g.last, g.first_subscribed, g.total, g.pool_rate()
    g.stop()
    bench.release(g)
    return {
        "rate": rate,
        "rate_first_to_last": n / (t_end - t_ready),
        "e2e_s": t_end - spawned,
        "ready_s": t_ready - spawned,
        "handled": total,
        "cpu_us": cpu / n * 1e6,
    }


def fill(bench: Bench, rundir: Path, topic: str, n: int) -> None:
    pub = bench.publisher(rundir, topic, qos=1, count=n)
    report = pub.finish(drain_timeout(n))
    bench.release(pub)
    if report["acked"] != n:
        raise BenchError(f"backlog: broker acknowledged {report['acked']} of {n}")


def rq_live(bench: Bench, protocol: int, workers: int, qos: int, n: int) -> dict[str, Any]:
    tag, rundir = bench.rundir("tl")
    topic = f"bench/{tag}"
    manifest = write_manifest(
        rundir / "m.yaml",
        bench.port,
        protocol,
        [route(tag, topic, "stamp", workers, qos=qos, **STAMP)],
    )
    d = bench.daemon(manifest, rundir)
    d.wait_ready()
    pids = d.worker_pids()
    cpu0, mcpu0 = cpu_seconds(pids), cpu_seconds([d.pid])
    pub = bench.publisher(rundir, topic, qos=qos, count=n)

    def done(tr: Any) -> bool:
        if tr.total >= n:
            return True
        if qos == 1 or not pub.done:
            return False
        assert pub.report is not None
        return time.time() - max(tr.changed_at, pub.report["t_last"]) > SETTLE_ROUTEMQD

    trace = poll_handled(d, done, drain_timeout(n))
    cpu, mcpu = cpu_seconds(pids) - cpu0, cpu_seconds([d.pid]) - mcpu0
    report = pub.finish(60)
    bench.release(pub)
    t0 = report["t_first"]
    bench.stop_daemon(d)
    stamps = stamped(rundir, trace.total, "live")
    t_end = max(last for _, last in stamps.values())
    total = sum(c for c, _ in stamps.values())
    return {
        "rate": total / (t_end - t0),
        "handled": total,
        "lost": n - min(n, total),
        "pub_rate": report["rate"],
        "cpu_us": cpu / max(1, total) * 1e6,
        "master_cpu_us": mcpu / max(1, total) * 1e6,
    }


def base_live(bench: Bench, protocol: int, workers: int, qos: int, n: int) -> dict[str, Any]:
    tag, rundir = bench.rundir("bl")
    topic = f"bench/{tag}"
    flt = f"$share/bench/{topic}" if workers > 1 else topic
    g = bench.consumers(workers, bench.port, tag, flt, protocol, qos, rundir)
    g.wait_subscribed(60)
    cpu0 = cpu_seconds(g.pids)
    pub = bench.publisher(rundir, topic, qos=qos, count=n)
    changed = [time.time(), 0]

    def done() -> bool:
        total = g.total
        if total >= n:
            return True
        if total != changed[1]:
            changed[:] = [time.time(), total]
        if qos == 1 or not pub.done:
            return False
        assert pub.report is not None
        return time.time() - max(changed[0], pub.report["t_last"]) > SETTLE_BASELINE

    wait_until(done, drain_timeout(n), "baseline live", every=0.02)
    cpu = cpu_seconds(g.pids) - cpu0
    report = pub.finish(60)
    bench.release(pub)
    t_end, total = g.last, g.total
    g.stop()
    bench.release(g)
    t0 = report["t_first"]
    return {
        "rate": total / (t_end - t0),
        "handled": total,
        "lost": n - min(n, total),
        "pub_rate": report["rate"],
        "cpu_us": cpu / max(1, total) * 1e6,
    }


def section_throughput(bench: Bench, plan: Plan, rec: Recorder) -> None:
    for rep in range(plan.repeat):
        for mode, qos_levels in (("backlog", (1,)), ("live", (1, 0))):
            for qos in qos_levels:
                for protocol in plan.protocols:
                    for workers in plan.workers:
                        n = plan.messages[workers]
                        systems = ["routemqd", "baseline"]
                        if rep % 2:
                            systems.reverse()
                        for system in systems:
                            key = {
                                "case": "throughput",
                                "mode": mode,
                                "qos": qos,
                                "protocol": protocol,
                                "workers": workers,
                                "system": system,
                                "repeat": rep,
                                "messages": n,
                            }
                            if mode == "backlog":
                                fn = rq_backlog if system == "routemqd" else base_backlog
                                rec.run(key, partial(fn, bench, protocol, workers, n))
                            else:
                                fn = rq_live if system == "routemqd" else base_live
                                rec.run(key, partial(fn, bench, protocol, workers, qos, n))


# --------------------------------------------------------------------------------- latency

LATENCY_WORKERS = 2


def latency_run(bench: Bench, plan: Plan, system: str) -> dict[str, Any]:
    tag, rundir = bench.rundir("lat")
    topic = f"bench/{tag}"
    count = int(plan.latency_rate * plan.latency_s)
    w = LATENCY_WORKERS
    if system == "routemqd":
        manifest = write_manifest(
            rundir / "m.yaml", bench.port, 5, [route(tag, topic, "latency", w)]
        )
        consumer: Any = bench.daemon(manifest, rundir)
        consumer.wait_ready()
        prefix = "lat"
    else:
        consumer = bench.consumers(
            w, bench.port, tag, f"$share/bench/{topic}", 5, 1, rundir, record=rundir
        )
        consumer.wait_subscribed(60)
        prefix = "base"
    pids = consumer.worker_pids() if isinstance(consumer, RouteDaemon) else consumer.pids
    cpu0 = cpu_seconds(pids)
    pub = bench.publisher(rundir, topic, qos=1, count=count, rate=plan.latency_rate, stamp=True)
    report = pub.finish(plan.latency_s + 60)
    bench.release(pub)
    expected = int(report["acked"])
    wait_until(
        lambda: len(latencies_ms(rundir, prefix)) >= expected, 60, "latency records", every=0.2
    )
    cpu = cpu_seconds(pids) - cpu0
    if isinstance(consumer, RouteDaemon):
        bench.stop_daemon(consumer)
    else:
        consumer.stop()
        bench.release(consumer)
    lat = latencies_ms(rundir, prefix)
    return {
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat),
        "samples": len(lat),
        "pub_rate": report["rate"],
        "cpu_us": cpu / max(1, len(lat)) * 1e6,
    }


def section_latency(bench: Bench, plan: Plan, rec: Recorder) -> None:
    for rep in range(plan.repeat):
        systems = ["routemqd", "baseline"] if rep % 2 == 0 else ["baseline", "routemqd"]
        for system in systems:
            key = {"case": "latency", "system": system, "repeat": rep}
            rec.run(key, partial(latency_run, bench, plan, system))


# ------------------------------------------------------------------------------ handlers

HANDLER_CASES: tuple[tuple[str, str, Callable[[int], float]], ...] = (
    ("burn_1ms", "1 ms CPU", lambda c: 1000.0),
    ("sleep_10ms", "10 ms time.sleep", lambda c: 100.0 * c),
    ("async_sleep_10ms", "10 ms asyncio.sleep", lambda c: 100.0 * c),
)


def handler_run(
    bench: Bench, plan: Plan, handler: str, concurrency: int, ideal: float
) -> dict[str, Any]:
    tag, rundir = bench.rundir("hc")
    topic = f"bench/{tag}"
    m = max(50, int(ideal * plan.handler_s))
    r = route(tag, topic, handler, 1, shared=True, concurrency=concurrency, **STAMP)
    manifest = write_manifest(rundir / "m.yaml", bench.port, 5, [r])
    d = bench.daemon(manifest, rundir)
    d.wait_ready()
    pub = bench.publisher(rundir, topic, qos=1, count=m)
    poll_handled(d, lambda tr: tr.total >= m, 60 + 10 * m / ideal)
    report = pub.finish(60)
    bench.release(pub)
    t0 = report["t_first"]
    bench.stop_daemon(d)
    t_end = max(last for _, last in stamped(rundir, m, "handlers").values())
    rate = m / (t_end - t0)
    return {"rate": rate, "ideal": ideal, "efficiency": rate / ideal, "messages": m}


def section_handlers(bench: Bench, plan: Plan, rec: Recorder) -> None:
    for rep in range(plan.repeat):
        for handler, _label, ideal_for in HANDLER_CASES:
            for c in plan.concurrency:
                key = {"case": "handlers", "handler": handler, "concurrency": c, "repeat": rep}
                rec.run(key, partial(handler_run, bench, plan, handler, c, ideal_for(c)))


# ------------------------------------------------------------------------------ recovery

RECOVERY_WORKERS = 2
HEALTHY_AFTER = 0.3


def recovery_run(bench: Bench, plan: Plan) -> dict[str, Any]:
    tag, rundir = bench.rundir("rec")
    topic = f"bench/{tag}"
    manifest = write_manifest(
        rundir / "m.yaml",
        bench.port,
        5,
        [route(tag, topic, "ledger", RECOVERY_WORKERS)],
        # every kill is a first failure (restart at once), never a crash loop: the slot was
        # ready for longer than healthy_after when it is killed
        supervisor={"healthy_after": HEALTHY_AFTER, "failure_limit": 1000, "failure_window": 1},
    )
    d = bench.daemon(manifest, rundir)
    d.wait_ready()
    pub = bench.publisher(rundir, topic, qos=1, rate=plan.kill_rate)
    time.sleep(0.5)
    kill_ready: list[float] = []
    kill_reaped: list[float] = []
    spawn_ready: list[float] = []
    d.poll_log()
    for k in range(plan.kills):
        slot = k % RECOVERY_WORKERS
        entry = next(s for s in d.status()["slots"] if s["index"] == slot)
        old = int(entry["pid"])
        ready_at = d.ready_times().get(old)
        if entry["state"] != "ready" or ready_at is None:
            raise BenchError(f"slot {slot} not ready before kill {k}: {entry}")
        wait = ready_at + HEALTHY_AFTER + 0.05 - time.time()
        if wait > 0:
            time.sleep(wait)
        t_kill = time.time()
        kill_worker(old, d.pid)
        found: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 10
        while "worker_ready" not in found:
            for e in d.poll_log():
                if e.get("slot") != slot:
                    continue
                name = e.get("event")
                if name == "worker_died" and e.get("pid") == old:
                    found[name] = e
                elif name in ("worker_spawned", "worker_ready") and e.get("pid") != old:
                    found.setdefault(name, e)
            if time.monotonic() > deadline:
                raise BenchError(f"kill {k}: no replacement ready in 10 s")
            time.sleep(0.002)
        ready = found["worker_ready"]
        kill_ready.append((ready["_at"] - t_kill) * 1000)
        spawn_ready.append(float(ready.get("startup_ms", float("nan"))))
        if "worker_died" in found:
            kill_reaped.append((found["worker_died"]["_at"] - t_kill) * 1000)
    time.sleep(0.5)
    pub.stop()
    bench.release(pub)
    acked = pub.acked_ids()
    missing = wait_ledger(rundir, acked, 60)
    entries = ledger(rundir)
    bench.stop_daemon(d)
    return {
        "kills": len(kill_ready),
        "p50_ms": percentile(kill_ready, 50),
        "p99_ms": percentile(kill_ready, 99),
        "max_ms": max(kill_ready),
        "reaped_p50_ms": percentile(kill_reaped, 50),
        "spawn_ready_p50_ms": percentile(spawn_ready, 50),
        "published": len(acked),
        "lost": len(missing),
        "duplicates": len(entries) - len({e[0] for e in entries}),
        "kill_ready_ms": kill_ready,
        "kill_reaped_ms": kill_reaped,
        "spawn_ready_ms": spawn_ready,
    }


def section_recovery(bench: Bench, plan: Plan, rec: Recorder) -> None:
    for rep in range(plan.repeat):
        rec.run({"case": "recovery", "repeat": rep}, partial(recovery_run, bench, plan))


# -------------------------------------------------------------------------------- reload


def reload_run(bench: Bench, plan: Plan) -> dict[str, Any]:
    tag, rundir = bench.rundir("rl")
    topic = f"bench/{tag}"
    slots = plan.reload_slots

    def manifest(handler: str) -> Path:
        return write_manifest(rundir / "m.yaml", bench.port, 5, [route(tag, topic, handler, slots)])

    manifest("ledger")
    d = bench.daemon(rundir / "m.yaml", rundir)
    d.wait_ready()
    pub = bench.publisher(rundir, topic, qos=1, rate=plan.reload_rate)
    time.sleep(plan.reload_load_s)
    old = {int(s["pid"]) for s in d.status()["slots"]}
    manifest("ledger_v2")
    t_hup = time.time()
    d.signal(signal.SIGHUP)
    new: set[int] = set()

    def replaced() -> bool:
        nonlocal new
        try:
            slots_now = d.status()["slots"]
        except OSError:
            return False
        new = {int(s["pid"] or 0) for s in slots_now}
        return (
            len(slots_now) == slots
            and all(s["state"] == "ready" and not s["replacing"] for s in slots_now)
            and not new & old
        )

    wait_until(replaced, 120, "reload: all slots replaced", every=0.02)
    ready = d.ready_times()
    t_done = max(ready[p] for p in new)
    applied = d.named("reload_applied")
    time.sleep(plan.reload_load_s / 2)
    pub.stop()
    bench.release(pub)
    acked = pub.acked_ids()
    missing = wait_ledger(rundir, acked, 60)
    entries = ledger(rundir)
    bench.stop_daemon(d)
    times = [e[2] for e in entries]
    return {
        "duration_s": t_done - t_hup,
        "applied_s": (applied[-1]["_at"] - t_hup) if applied else float("nan"),
        "gap_ms": longest_gap(times, t_hup, t_done) * 1000,
        "gap_before_ms": longest_gap(times, t_hup - 1.0, t_hup) * 1000,
        "published": len(acked),
        "lost": len(missing),
        "duplicates": len(entries) - len({e[0] for e in entries}),
        "handled_v2": sum(1 for e in entries if e[3] == "v2"),
    }


def section_reload(bench: Bench, plan: Plan, rec: Recorder) -> None:
    for rep in range(plan.repeat):
        rec.run({"case": "reload", "repeat": rep}, partial(reload_run, bench, plan))


# -------------------------------------------------------------------------------- master


def master_run(bench: Bench, plan: Plan, slots: int) -> dict[str, Any]:
    tag, rundir = bench.rundir("mc")
    topic = f"bench/{tag}"
    manifest = write_manifest(rundir / "m.yaml", bench.port, 5, [route(tag, topic, "noop", slots)])
    d = bench.daemon(manifest, rundir)
    status = d.wait_ready(120)
    pids = [int(s["pid"]) for s in status["slots"]]
    ready = d.ready_times()
    t_all = max(ready[p] for p in pids)
    master_ready = d.named("master_ready")
    time.sleep(2.0)
    master = psutil.Process(d.pid)
    workers = [psutil.Process(p) for p in pids]
    before = [cpu_seconds([p]) for p in [d.pid, *pids]]
    time.sleep(plan.idle_s)
    after = [cpu_seconds([p]) for p in [d.pid, *pids]]
    used = [b - a for a, b in zip(before, after, strict=True)]
    mem = master.memory_full_info()
    w_mem = [p.memory_full_info() for p in workers]
    bench.stop_daemon(d)
    mib = 1024 * 1024
    return {
        "startup_s": t_all - d.spawned,
        "master_ready_ms": float(master_ready[0]["startup_ms"]) if master_ready else float("nan"),
        "master_cpu_pct": used[0] / plan.idle_s * 100,
        "workers_cpu_pct": sum(used[1:]) / plan.idle_s * 100,
        "master_rss_mb": mem.rss / mib,
        "master_uss_mb": mem.uss / mib,
        "worker_rss_mb": statistics.median(m.rss for m in w_mem) / mib,
        "worker_uss_mb": statistics.median(m.uss for m in w_mem) / mib,
    }


def section_master(bench: Bench, plan: Plan, rec: Recorder) -> None:
    for rep in range(plan.repeat):
        for slots in plan.slot_counts:
            key = {"case": "master", "slots": slots, "repeat": rep}
            rec.run(key, partial(master_run, bench, plan, slots))


# ------------------------------------------------------------------------------- summary


def med(runs: list[dict[str, Any]], name: str) -> float | None:
    values = [float(r[name]) for r in runs if r.get(name) is not None]
    values = [v for v in values if v == v]
    return statistics.median(values) if values else None


@dataclass
class Row:
    section: str
    case: str
    routemqd: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    status: str = ""


def num(v: float | None, digits: int = 0, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{unit}"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISS")


def summarize(rec: Recorder, plan: Plan) -> list[Row]:
    rows: list[Row] = []
    t = TARGETS
    for mode, qos_levels in (("backlog", (1,)), ("live", (1, 0))):
        for qos in qos_levels:
            for protocol in plan.protocols:
                for workers in plan.workers:
                    key = {"case": "throughput", "mode": mode, "qos": qos, "protocol": protocol}
                    rq = rec.select(**key, workers=workers, system="routemqd")
                    base = rec.select(**key, workers=workers, system="baseline")
                    if not rq and not base:
                        continue
                    a, b = med(rq, "rate"), med(base, "rate")
                    ratio = a / b if a and b else None
                    name = (
                        f"{'backlog drain' if mode == 'backlog' else 'publisher running'}, "
                        f"QoS {qos}, {proto_label(protocol)}, {workers} worker"
                        f"{'s' if workers > 1 else ''} (msg/s)"
                    )
                    if qos == 0:
                        lost_a, lost_b = med(rq, "lost"), med(base, "lost")
                        if lost_a or lost_b:
                            name += f"; QoS 0 dropped {num(lost_a)} / {num(lost_b)}"
                    rows.append(
                        Row(
                            "throughput",
                            name,
                            num(a),
                            num(b),
                            num(ratio, 2),
                            f">= {t['throughput_ratio']:.2f} x baseline",
                            verdict(None if ratio is None else ratio >= t["throughput_ratio"]),
                        )
                    )
    for mode, qos_levels in (("backlog", (1,)), ("live", (1, 0))):
        for qos in qos_levels:
            for protocol in plan.protocols:
                key = {"case": "throughput", "mode": mode, "qos": qos, "protocol": protocol}
                for w in plan.workers:
                    rq = rec.select(**key, workers=w, system="routemqd")
                    base = rec.select(**key, workers=w, system="baseline")
                    a, b = med(rq, "cpu_us"), med(base, "cpu_us")
                    if a is None and b is None:
                        continue
                    what = "backlog drain" if mode == "backlog" else "publisher running"
                    ratio = a / b if a and b else None
                    rows.append(
                        Row(
                            "cpu/msg",
                            f"{what}, QoS {qos}, {proto_label(protocol)}, {w} worker"
                            f"{'s' if w > 1 else ''}: worker CPU per message (us; master "
                            f"{num(med(rq, 'master_cpu_us'), 1)} us)",
                            num(a, 1),
                            num(b, 1),
                            num(ratio, 2),
                            f"<= {t['cpu_ratio']:.2f} x baseline",
                            verdict(None if ratio is None else ratio <= t["cpu_ratio"]),
                        )
                    )
    rq, base = (
        rec.select(case="latency", system="routemqd"),
        rec.select(case="latency", system="baseline"),
    )
    if rq or base:
        for metric, label, target in (
            ("p50_ms", "p50", t["latency_p50_ms"]),
            ("p90_ms", "p90", None),
            ("p99_ms", "p99", t["latency_p99_ms"]),
            ("max_ms", "max", None),
        ):
            a, b = med(rq, metric), med(base, metric)
            ratio = a / b if a and b else None
            goal = f"<= {target:g} ms" if target else ""
            ok = None if target is None or a is None else a <= target
            if metric == "p99_ms":
                goal += f" and <= {t['latency_p99_ratio']:g} x baseline"
                ok = bool(ok) and ratio is not None and ratio <= t["latency_p99_ratio"]
            rows.append(
                Row(
                    "latency",
                    f"{label} publish -> handler, {plan.latency_rate} msg/s QoS 1, "
                    f"{LATENCY_WORKERS} workers (ms)",
                    num(a, 2),
                    num(b, 2),
                    num(ratio, 2),
                    goal,
                    verdict(ok),
                )
            )
    if rq or base:
        a, b = med(rq, "cpu_us"), med(base, "cpu_us")
        rows.append(
            Row(
                "latency",
                f"worker CPU per message at {plan.latency_rate} msg/s (us)",
                num(a, 1),
                num(b, 1),
                num(a / b if a and b else None, 2),
            )
        )
    for handler, label, ideal_for in HANDLER_CASES:
        for c in plan.concurrency:
            runs = rec.select(case="handlers", handler=handler, concurrency=c)
            if not runs:
                continue
            a, ideal = med(runs, "rate"), ideal_for(c)
            eff = a / ideal if a else None
            gated = handler == "burn_1ms" and c == 1
            rows.append(
                Row(
                    "handler cost",
                    f"{label}, concurrency {c}, 1 worker (msg/s; baseline column: ideal)",
                    num(a),
                    num(ideal),
                    num(eff, 2),
                    f">= {t['handler_efficiency']:.2f} x ideal" if gated else "",
                    verdict(None if not gated or eff is None else eff >= t["handler_efficiency"]),
                )
            )
    runs = rec.select(case="recovery")
    if runs:
        pooled = [v for r in runs for v in r["kill_ready_ms"]]
        reaped = [v for r in runs for v in r["kill_reaped_ms"]]
        spawned = [v for r in runs for v in r["spawn_ready_ms"]]
        lost = sum(int(r["lost"]) for r in runs)
        published = sum(int(r["published"]) for r in runs)
        p50, p99 = percentile(pooled, 50), percentile(pooled, 99)
        rows += [
            Row(
                "recovery",
                f"SIGKILL -> replacement ready, p50 ({len(pooled)} kills, ms)",
                num(p50, 1),
                target=f"<= {t['kill_ready_p50_ms']:g} ms",
                status=verdict(p50 <= t["kill_ready_p50_ms"]),
            ),
            Row(
                "recovery",
                "SIGKILL -> replacement ready, p99 (ms)",
                num(p99, 1),
                target=f"<= {t['kill_ready_p99_ms']:g} ms",
                status=verdict(p99 <= t["kill_ready_p99_ms"]),
            ),
            Row("recovery", "SIGKILL -> replacement ready, max (ms)", num(max(pooled), 1)),
            Row(
                "recovery",
                "  of which SIGKILL -> master logs worker_died, p50 (ms)",
                num(percentile(reaped, 50), 1),
            ),
            Row(
                "recovery",
                "  of which fork -> worker ready (startup_ms), p50 (ms)",
                num(percentile(spawned, 50), 1),
            ),
            Row(
                "recovery",
                f"messages lost ({published} published at {plan.kill_rate:g} msg/s QoS 1)",
                str(lost),
                target="0",
                status=verdict(lost == 0),
            ),
        ]
    runs = rec.select(case="reload")
    if runs:
        lost = sum(int(r["lost"]) for r in runs)
        rows += [
            Row(
                "reload",
                f"changed handler, {plan.reload_slots} slots, {plan.reload_rate:g} msg/s: "
                "SIGHUP -> all new workers ready (s)",
                num(med(runs, "duration_s"), 2),
            ),
            Row(
                "reload",
                "longest gap between handled messages during the reload (ms)",
                num(med(runs, "gap_ms"), 1),
                num(med(runs, "gap_before_ms"), 1),
                target="",
                status="",
            ),
            Row(
                "reload",
                f"messages lost ({sum(int(r['published']) for r in runs)} published)",
                str(lost),
                target="0",
                status=verdict(lost == 0),
            ),
        ]
    for slots in plan.slot_counts:
        runs = rec.select(case="master", slots=slots)
        if not runs:
            continue
        big = slots == max(plan.slot_counts)
        cpu, rss = med(runs, "master_cpu_pct"), med(runs, "master_rss_mb")
        start = med(runs, "startup_s")
        rows += [
            Row(
                "master",
                f"{slots} slots: master idle CPU over {plan.idle_s:g} s (%)",
                num(cpu, 2),
                target=f"<= {t['master_cpu_pct']:g} %" if big else "",
                status=verdict(cpu <= t["master_cpu_pct"] if big and cpu is not None else None),
            ),
            Row(
                "master",
                f"{slots} slots: master RSS / USS (MiB)",
                f"{num(rss, 1)} / {num(med(runs, 'master_uss_mb'), 1)}",
                target=f"RSS <= {t['master_rss_mb']:g} MiB" if big else "",
                status=verdict(rss <= t["master_rss_mb"] if big and rss is not None else None),
            ),
            Row(
                "master",
                f"{slots} slots: start -> all ready (s)",
                num(start, 2),
                target=f"<= {t['startup_64_s']:g} s" if big else "",
                status=verdict(start <= t["startup_64_s"] if big and start is not None else None),
            ),
            Row(
                "master",
                f"{slots} slots: per worker RSS / USS, median (MiB)",
                f"{num(med(runs, 'worker_rss_mb'), 1)} / {num(med(runs, 'worker_uss_mb'), 1)}",
            ),
            Row(
                "master",
                f"{slots} slots: all workers' idle CPU together (% of a core)",
                num(med(runs, "workers_cpu_pct"), 2),
            ),
        ]
    autoscale = [r for r in rec.runs if r.get("case") == "autoscale"]
    rows += [Row("autoscale", case, value) for case, value in summary_rows(autoscale)]
    return rows


def markdown(rows: list[Row]) -> str:
    head = (
        "| section | case | routemqd | baseline | ratio | target | |\n"
        "|---|---|---:|---:|---:|---|---|\n"
    )
    body = "".join(
        f"| {r.section} | {r.case} | {r.routemqd} | {r.baseline} | {r.ratio} | {r.target} "
        f"| {r.status} |\n"
        for r in rows
    )
    return head + body


def text_table(rows: list[Row]) -> str:
    cols = [
        ("case", [f"{r.section}: {r.case}" for r in rows]),
        ("routemqd", [r.routemqd for r in rows]),
        ("baseline", [r.baseline for r in rows]),
        ("ratio", [r.ratio for r in rows]),
        ("target", [r.target for r in rows]),
        ("", [r.status for r in rows]),
    ]
    widths = [max(len(h), *(len(v) for v in vals)) for h, vals in cols]
    lines = []
    header = [
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, ((h, _), w) in enumerate(zip(cols, widths, strict=True))
    ]
    lines.append("  ".join(header))
    lines.append("  ".join("-" * w for w in widths))
    for i in range(len(rows)):
        cells = []
        for j, ((_, vals), w) in enumerate(zip(cols, widths, strict=True)):
            v = vals[i]
            cells.append(v.ljust(w) if j in (0, 4, 5) else v.rjust(w))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------- charts


def charts(rec: Recorder, plan: Plan, out: Path) -> list[str]:
    """The PNG charts; none without matplotlib (``make bench`` installs it), rather than losing
    a finished run's table and JSON to an ImportError at the very end."""
    try:
        import matplotlib
    except ImportError:
        print("no charts: matplotlib is not installed (pip install -e '.[bench]')", flush=True)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = [("backlog", 1), ("live", 1), ("live", 0)]
    fig, axes = plt.subplots(
        len(panels),
        len(plan.protocols),
        figsize=(5.5 * len(plan.protocols), 3.6 * len(panels)),
        squeeze=False,
    )
    any_data = False
    for i, (mode, qos) in enumerate(panels):
        for j, protocol in enumerate(plan.protocols):
            ax = axes[i][j]
            for system, color in (("routemqd", "tab:blue"), ("baseline", "tab:gray")):
                xs, ys, lo, hi = [], [], [], []
                for w in plan.workers:
                    runs = rec.select(
                        case="throughput",
                        mode=mode,
                        qos=qos,
                        protocol=protocol,
                        workers=w,
                        system=system,
                    )
                    rates = [float(r["rate"]) for r in runs]
                    if not rates:
                        continue
                    m = statistics.median(rates)
                    xs.append(w)
                    ys.append(m)
                    lo.append(m - min(rates))
                    hi.append(max(rates) - m)
                if xs and system == "baseline":
                    ax.plot(
                        xs,
                        [y * TARGETS["throughput_ratio"] for y in ys],
                        linestyle=":",
                        color="tab:red",
                        label=f"target: {TARGETS['throughput_ratio']:g} x baseline",
                    )
                if xs:
                    any_data = True
                    label = "routemqd" if system == "routemqd" else "paho consumers (baseline)"
                    ax.errorbar(
                        xs, ys, yerr=[lo, hi], marker="o", capsize=4, color=color, label=label
                    )
            what = "backlog drain" if mode == "backlog" else "publisher running"
            ax.set_title(f"{what}, QoS {qos}, {proto_label(protocol)}", fontsize=10)
            ax.set_xticks(list(plan.workers))
            ax.set_xlabel("worker processes")
            ax.set_ylabel("msg/s (median, min-max)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    if any_data:
        fig.suptitle(f"No-op handler, {100}-byte payloads, {os.cpu_count()} cores", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        written.append("throughput.png")
    plt.close(fig)

    runs = rec.select(case="recovery")
    pooled = [v for r in runs for v in r["kill_ready_ms"]]
    if pooled:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        hi = max(max(pooled), TARGETS["kill_ready_p99_ms"]) * 1.05
        width = max(1.0, hi / 80)
        edges = [i * width for i in range(int(hi / width) + 2)]
        ax.hist(pooled, bins=edges, color="tab:blue", alpha=0.8)
        for q, style in ((50, "-"), (99, "--")):
            v = percentile(pooled, q)
            ax.axvline(v, color="black", linestyle=style, label=f"p{q} {v:.1f} ms")
        ax.axvline(
            TARGETS["kill_ready_p50_ms"],
            color="tab:red",
            linestyle="-",
            alpha=0.6,
            label="target p50",
        )
        ax.axvline(
            TARGETS["kill_ready_p99_ms"],
            color="tab:red",
            linestyle="--",
            alpha=0.6,
            label="target p99",
        )
        ax.set_xlabel("SIGKILL -> replacement ready (ms)")
        ax.set_ylabel("kills")
        ax.set_title(f"Recovery: {len(pooled)} kills")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "recovery.png", dpi=110)
        plt.close(fig)
        written.append("recovery.png")
    return written


# -------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        nproc = str(os.cpu_count())
    try:
        out = subprocess.run(
            [str(find_mosquitto()), "-h"], capture_output=True, text=True, timeout=5
        )
        mosq = (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        mosq = "unknown"
    import paho.mqtt

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("--no-optional-locks", "status", "--porcelain", "--", "routemqd"):
        commit += " + uncommitted changes in routemqd/"
    return {
        "routemqd_commit": commit,
        "nproc": nproc,
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "paho_mqtt": getattr(paho.mqtt, "__version__", "unknown"),
        "mosquitto": mosq,
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_readme(
    out: Path, rows: list[Row], info: dict[str, Any], plan: Plan, pngs: list[str], elapsed: float
) -> None:
    mode = "quick smoke run" if plan.quick else f"full run, {plan.repeat} repeats, medians"
    n = ", ".join(f"{w} worker{'s' if w > 1 else ''}: {m:,}" for w, m in plan.messages.items())
    text = f"""# routemqd benchmark results

`make bench` (`.venv/bin/python bench/run.py{" --quick" if plan.quick else ""}`): {mode}.
Total run time {elapsed / 60:.1f} min.

## Machine

| | |
|---|---|
| date | {info["date"]} |
| routemqd | {info["routemqd_commit"]} |
| nproc | {info["nproc"]} |
| CPU | {info["cpu"]} |
| RAM | {info["ram_gib"]} GiB |
| Python | {info["python"]} |
| paho-mqtt | {info["paho_mqtt"]} |
| mosquitto | {info["mosquitto"]} |
| kernel | {info["kernel"]} |
| load average at start / end | {info["loadavg_start"]} / {info.get("loadavg_end")} |

The machine is shared: other test suites may have run at the same time, which shows as noise,
mostly in the throughput and latency numbers. Each case alternates which system runs first.

## Results

Medians over the repeats; ratio = routemqd / baseline. MISS marks a missed target.
{QUICK_NOTE if plan.quick else ""}
{markdown(rows)}
{"".join(f"![{p}]({p})" + chr(10) + chr(10) for p in pngs)}
## Method

- One mosquitto ({info["mosquitto"]}) with `etc/mosquitto.conf` on a private loopback port for
  the whole run. Every message comes from `bench/publisher.py`, a raw-socket MQTT 3.1.1
  publisher (QoS 1 with up to 2,000 PUBACKs outstanding), 100-byte payloads.
- Baseline: `bench/consumer.py`, one process per worker, a paho-mqtt client with a persistent
  session (MQTT 5: session expiry 1 h and Receive Maximum 17, the same as a routemqd worker with
  the default prefetch 16 and concurrency 1), on the same `$share/...` filter (the plain filter
  for 1 worker), a handler inline in `on_message` that counts and stamps each message (auto-ack).
- routemqd: `routemqd run` with `bench.handlers:stamp` (`bench/handlers.py`, imported through
  `python_path`; it counts and stamps each message like the baseline's `on_message`, and its
  `teardown` hook `write_stamp` leaves the count and the last time in a file), one route,
  default settings.
- Backlog drain: subscribe, stop (routemqd: SIGTERM, sessions kept), publish N messages, start
  again; msg/s = the sum over the workers of what each handled divided by the time from its
  ready (SUBACK) to its last message, so processes that start a little later than the others
  do not count against the pool (`results.json` also has N / first ready to last message, and
  start to last message as `e2e_s`). Publisher running:
  consumers ready, the publisher sends N as fast as it can; msg/s from the first publish to the
  last message handled. N by worker count: {n}.
- Both systems are timed by their handlers: the time of the last message handled, taken in the
  handler (routemqd: `stamp`, reported at the worker's graceful stop; baseline: `on_message`,
  reported on stdout). `routemqd status` (polled every 50 ms) only tells when a run is over.
- Latency: {plan.latency_rate} msg/s QoS 1 for {plan.latency_s:g} s, MQTT 5, {LATENCY_WORKERS}
  workers; `time.time_ns()` in the payload at send, again at handler start.
- Recovery: {RECOVERY_WORKERS} workers, the slots killed in turn; each is killed only after it was
  ready for `healthy_after` ({HEALTHY_AFTER} s in this manifest), so every kill is a first failure
  (restarted at once, no backoff). Ready = the master's `worker_ready` log event.
- Reload: the handler of a {plan.reload_slots}-slot route changes, SIGHUP; done when every slot
  runs a new worker and is ready. The baseline column of the gap row is the longest gap in the
  second before the SIGHUP.
- Master cost: one route with N slots, default supervisor settings, no traffic; CPU over
  {plan.idle_s:g} s from `cpu_times`; memory from `memory_full_info()`.

Raw numbers of every run: `results.json`.
"""
    (out / "README.md").write_text(text)


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    parser.add_argument("--repeat", type=int, default=0, help="repeats of each case (default 3)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}"
    )
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    plan = make_plan(args)
    if not plan.quick and plan.repeat < 3:
        print(f"note: {plan.repeat} repeat(s); the full run is meant for 3 or more")

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    info = machine()
    rec = Recorder()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="routemqd-bench-"))
    bench = Bench(workdir)
    sections: dict[str, Callable[[Bench, Plan, Recorder], None]] = {
        "throughput": section_throughput,
        "latency": section_latency,
        "handlers": section_handlers,
        "recovery": section_recovery,
        "reload": section_reload,
        "master": section_master,
        "autoscale": lambda b, p, r: section_autoscale(b, p.repeat, r.run),
    }
    try:
        bench.start()
        print(
            f"routemqd bench: {'quick' if plan.quick else 'full'}, {plan.repeat} repeat(s), "
            f"mosquitto pid {bench.broker.pid} on 127.0.0.1:{bench.port}, work dir {workdir}",
            flush=True,
        )
        for name in plan.sections:
            print(f"== {name}", flush=True)
            sections[name](bench, plan, rec)
    finally:
        bench.close_all()
        stop_tracked()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = summarize(rec, plan)
    pngs = charts(rec, plan, out)
    errors = [r for r in rec.runs if "error" in r]
    doc = {
        "machine": info,
        "plan": asdict(plan),
        "targets": TARGETS,
        "elapsed_s": round(elapsed, 1),
        "summary": [asdict(r) for r in rows],
        "runs": rec.runs,
        "errors": len(errors),
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    write_readme(out, rows, info, plan, pngs, elapsed)
    print()
    print(text_table(rows))
    print()
    if plan.quick:
        print(QUICK_NOTE)
    misses = sum(1 for r in rows if r.status == "MISS")
    print(
        f"{len(rec.runs)} runs, {len(errors)} failed, {misses} target(s) missed; "
        f"total {elapsed:.0f} s ({elapsed / 60:.1f} min); results in {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
