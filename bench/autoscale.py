"""The autoscale case of ``make bench``: an autoscaled pool against fixed pools of 1 and 4.

Load: 50 msg/s QoS 1 for a warm-up, then a step to 1,200 msg/s for ``STEP_S`` (more than one
worker with a 2 ms handler can take, less than four), then silence. Every id goes through the
ledger handler, so the same run also counts what was lost.

Two numbers per pool:

- **time to keep up**: from the step until the backlog (published so far minus handled so far)
  peaks, i.e. stops growing. A fixed pool of 1 never keeps up: its backlog peaks when the step
  ends, so its value is the step length.
- **messages per CPU-second** over the whole run: every id handled, divided by the CPU time of
  the master and all its workers (the reaped ones included, through the master's children
  times). A fixed pool of 4 keeps up at once but idles at 3 workers' worth the rest of the time.

The case runs only when the daemon reports pool sizes in ``routemqd status`` (``pools``: min,
max, desired, actual); until the master runs the scaler it records itself as skipped.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import psutil

from bench.infra import Bench, ledger, route, wait_ledger, wait_until, write_manifest

WARMUP_RATE = 50
WARMUP_S = 10.0
STEP_RATE = 1200
STEP_S = 30.0
SHRINK_TIMEOUT = 180.0
POOLS: tuple[str, ...] = ("auto", "fixed-1", "fixed-4")
SCALING = {"up_after": "2s", "down_after": "10s"}


def pool_route(tag: str, topic: str, pool: str) -> dict[str, Any]:
    r = route(tag, topic, "ledger_sleep_2ms", 4, shared=True)
    if pool == "auto":
        r["workers"] = {"min": 1, "max": 4}
        r["scaling"] = SCALING
    else:
        r["workers"] = int(pool.split("-")[1])
    return r


def pool_size(status: dict[str, Any], name: str) -> tuple[int, int] | None:
    """(desired, actual) from status, None while the daemon does not report pools."""
    for p in status.get("pools") or ():
        if p.get("route") == name:
            return int(p["desired"]), int(p["actual"])
    return None


def tree_cpu(master_pid: int) -> float:
    """CPU seconds of the master, its live workers and the workers it has reaped."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        master = psutil.Process(master_pid)
        t = master.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
        for child in master.children():
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
    return total


def backlog_peak(sent: int, first: float, last: float, handled: list[float], t0: float) -> float:
    """Seconds from ``t0`` to the highest backlog, sampled every 0.25 s. The publisher keeps a
    steady rate, so what it had sent by ``t`` is interpolated between its first and last send."""
    handled = sorted(handled)
    best_t, best, t, h = t0, -1.0, t0, 0
    while t <= last:
        published = sent * min(1.0, max(0.0, (t - first) / max(1e-9, last - first)))
        while h < len(handled) and handled[h] <= t:
            h += 1
        if published - h > best:
            best_t, best = t, published - h
        t += 0.25
    return best_t - t0


def autoscale_run(bench: Bench, pool: str) -> dict[str, Any]:
    tag, rundir = bench.rundir("as")
    topic = f"bench/{tag}"
    write_manifest(rundir / "m.yaml", bench.port, 5, [pool_route(tag, topic, pool)])
    d = bench.daemon(rundir / "m.yaml", rundir)
    d.wait_ready()
    if pool == "auto" and pool_size(d.status(), tag) is None:
        bench.stop_daemon(d)
        return {"skipped": "the daemon does not report pool sizes yet (scaler not wired)"}
    cpu0 = tree_cpu(d.pid)
    sizes: list[int] = []
    warm = bench.publisher(rundir, topic, qos=1, rate=WARMUP_RATE)
    time.sleep(WARMUP_S)
    warm.stop()
    bench.release(warm)
    t_step = time.time()
    step = bench.publisher(rundir, topic, qos=1, rate=STEP_RATE, start_id=10_000_000)
    while time.time() - t_step < STEP_S:
        status = d.status()
        size = pool_size(status, tag)
        ready = sum(1 for x in status["slots"] if x["route"] == tag and x["state"] == "ready")
        sizes.append(size[1] if size is not None else ready)
        time.sleep(0.5)
    report = step.stop()
    bench.release(step)
    acked = warm.acked_ids() | step.acked_ids()
    missing = wait_ledger(rundir, acked, 300)
    shrink_s = float("nan")
    if pool == "auto":
        t_quiet = time.time()
        wait_until(lambda: pool_size(d.status(), tag) == (1, 1), SHRINK_TIMEOUT, "shrink to 1")
        shrink_s = time.time() - t_quiet
    cpu = tree_cpu(d.pid) - cpu0
    entries = ledger(rundir)
    bench.stop_daemon(d)
    step_ids = step.acked_ids()
    handled_step = [e[2] for e in entries if e[0] in step_ids]
    first, last = float(report["t_first"]), float(report["t_last"])
    return {
        "keep_up_s": backlog_peak(int(report["sent"]), first, last, handled_step, t_step),
        "msgs_per_cpu_s": len({e[0] for e in entries}) / cpu if cpu > 0 else float("nan"),
        "max_workers": max(sizes, default=0),
        "shrink_s": shrink_s,
        "published": len(acked),
        "lost": len(missing),
    }


def section_autoscale(bench: Bench, repeat: int, record: Any) -> None:
    """``record(key, fn)`` is run.py's ``Recorder.run``; pools interleave within each repeat."""
    for rep in range(repeat):
        for pool in POOLS:
            record(
                {"case": "autoscale", "pool": pool, "repeat": rep},
                lambda p=pool: autoscale_run(bench, p),
            )


def summary_rows(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(case, value) lines for the results table, medians over repeats."""
    out = []
    for pool in POOLS:
        done = [r for r in runs if r.get("pool") == pool and "keep_up_s" in r]
        if not done:
            skipped = any(r.get("pool") == pool and "skipped" in r for r in runs)
            out.append((f"{pool}: keep up after the step", "skipped" if skipped else "n/a"))
            continue
        keep = statistics.median(r["keep_up_s"] for r in done)
        per_cpu = statistics.median(r["msgs_per_cpu_s"] for r in done)
        lost = sum(r["lost"] for r in done)
        most = max(r["max_workers"] for r in done)
        out.append((f"{pool}: backlog stops growing after the step (s)", f"{keep:.1f}"))
        out.append((f"{pool}: messages per CPU-second, whole run", f"{per_cpu:,.0f}"))
        out.append((f"{pool}: most workers / lost", f"{most} / {lost}"))
    return out
