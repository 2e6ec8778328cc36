"""Processes and measurements shared by the benchmark cases in ``bench/run.py``.

Every process started here (routemqd daemons, baseline consumers, publishers) is registered with
``tests.support.processes`` by PID and stopped by PID: by its owner when a case ends, by
:meth:`Bench.close_all` when the run ends or fails, and by that module's ``atexit`` hook as the
last resort.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.broker import Broker  # noqa: E402
from tests.support.daemon import Daemon  # noqa: E402
from tests.support.processes import stop_pid, track_pid, untrack_pid  # noqa: E402

BENCH_DIR = REPO_ROOT / "bench"
PYTHON = sys.executable
PAYLOAD_BYTES = 100
STOP_TIMEOUT = 60.0


class BenchError(RuntimeError):
    """A case could not complete (a bounded wait ran out, a process failed)."""


class Closeable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closeable)


def proto_label(protocol: int) -> str:
    return "MQTT 5" if protocol == 5 else "MQTT 3.1.1"


def wall_time(event: dict[str, Any]) -> float:
    """Unix time of a routemqd log event (ISO timestamp with microseconds, UTC)."""
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(every)


# ------------------------------------------------------------------------------- children


class JsonChild:
    """A child process that reports JSON lines on stdout and stops on a line on stdin."""

    def __init__(
        self,
        args: list[str],
        stderr_path: Path,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._stderr = open(stderr_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        track_pid(self.proc.pid)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._on_event = on_event
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if self._on_event is not None:
                self._on_event(event)
            self.events.put(event)

    def wait_event(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"pid {self.pid}: no {kind!r} within {timeout:g} s")
            try:
                event = self.events.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise BenchError(
                        f"pid {self.pid} exited with {self.proc.returncode} before {kind!r}"
                    ) from None
                continue
            if event.get("t") == kind:
                return event

    def tell_stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"pid {self.pid} still running after {timeout:g} s") from None
        untrack_pid(self.pid)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.tell_stop()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                stop_pid(self.pid, timeout=5)
                self.proc.wait(5)
        untrack_pid(self.pid)
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self._reader.join(2)
        self._stderr.close()


class Publisher(JsonChild):
    """``bench/publisher.py`` as a process: connected when constructed."""

    def __init__(
        self,
        port: int,
        topic: str,
        stderr_path: Path,
        *,
        qos: int = 1,
        count: int = 0,
        rate: float = 0,
        stamp: bool = False,
        start_id: int = 0,
    ) -> None:
        args = [
            PYTHON,
            str(BENCH_DIR / "publisher.py"),
            "--port",
            str(port),
            "--topic",
            topic,
            "--qos",
            str(qos),
            "--count",
            str(count),
            "--rate",
            str(rate),
            "--size",
            str(PAYLOAD_BYTES),
            "--start-id",
            str(start_id),
        ]
        if stamp:
            args.append("--stamp")
        super().__init__(args, stderr_path)
        self.report: dict[str, Any] | None = None
        self.wait_event("connected", 15)

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the publisher's report (it stops by itself after ``count`` messages)."""
        if self.report is None:
            self.report = self.wait_event("done", timeout)
            self.wait_exit(10)
        return self.report

    def stop(self, timeout: float = 90) -> dict[str, Any]:
        self.tell_stop()
        return self.finish(timeout)

    @property
    def done(self) -> bool:
        if self.report is None:
            with contextlib.suppress(queue.Empty):
                while True:
                    event = self.events.get_nowait()
                    if event.get("t") == "done":
                        self.report = event
                        break
        return self.report is not None

    def acked_ids(self) -> set[str]:
        r = self.report
        assert r is not None
        unacked = set(r["unacked"])
        start = int(r["start_id"])
        return {f"{i:010d}" for i in range(start, start + int(r["sent"])) if i not in unacked}


@dataclass
class ConsumerState:
    connected: float | None = None
    subscribed: float | None = None
    count: int = 0
    last: float = 0.0
    final: bool = False


class Consumers:
    """The baseline: ``k`` ``bench/consumer.py`` processes on one filter."""

    def __init__(
        self,
        k: int,
        port: int,
        tag: str,
        filter_: str,
        protocol: int,
        qos: int,
        rundir: Path,
        *,
        setup: bool = False,
        record: Path | None = None,
        end_session: bool = True,
    ) -> None:
        self.lock = threading.Lock()
        self.states = [ConsumerState() for _ in range(k)]
        self.children: list[JsonChild] = []
        try:
            for i in range(k):
                args = [
                    PYTHON,
                    str(BENCH_DIR / "consumer.py"),
                    "--port",
                    str(port),
                    "--client-id",
                    f"base-{tag}-{i}",
                    "--filter",
                    filter_,
                    "--protocol",
                    str(protocol),
                    "--qos",
                    str(qos),
                ]
                if setup:
                    args.append("--setup")
                if end_session:
                    args.append("--end-session")
                if record is not None:
                    args += ["--record", str(record)]
                self.children.append(
                    JsonChild(args, rundir / f"consumer-{i}.err", self._listener(i))
                )
        except BaseException:
            self.close()
            raise

    def _listener(self, i: int) -> Callable[[dict[str, Any]], None]:
        def on_event(event: dict[str, Any]) -> None:
            s = self.states[i]
            with self.lock:
                kind = event.get("t")
                if kind == "connected" and s.connected is None:
                    s.connected = float(event["at"])
                elif kind == "subscribed" and s.subscribed is None:
                    s.subscribed = float(event["at"])
                elif kind in ("count", "final"):
                    s.count = int(event["n"])
                    s.last = float(event["last"])
                    s.final = s.final or kind == "final"

        return on_event

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    @property
    def total(self) -> int:
        with self.lock:
            return sum(s.count for s in self.states)

    @property
    def last(self) -> float:
        with self.lock:
            return max(s.last for s in self.states)

    def pool_rate(self) -> float:
        """Sum over the consumers of what each handled / the time from its SUBACK to its last."""
        with self.lock:
            return sum(
                s.count / (s.last - s.subscribed)
                for s in self.states
                if s.count and s.subscribed is not None and s.last > s.subscribed
            )

    @property
    def first_subscribed(self) -> float:
        with self.lock:
            return min(s.subscribed or 0.0 for s in self.states)

    def wait_subscribed(self, timeout: float) -> None:
        def ok() -> bool:
            with self.lock:
                return all(s.subscribed is not None for s in self.states)

        wait_until(ok, timeout, "baseline consumers subscribed")

    def wait_exit(self, timeout: float) -> None:
        for c in self.children:
            rc = c.wait_exit(timeout)
            if rc != 0:
                raise BenchError(f"baseline consumer pid {c.pid} exited with {rc}")

    def stop(self, timeout: float = 30) -> None:
        for c in self.children:
            c.tell_stop()
        for c in self.children:
            c.wait_exit(timeout)

    def close(self) -> None:
        for c in self.children:
            c.close()


# ------------------------------------------------------------------------------- routemqd


def write_manifest(
    path: Path,
    port: int,
    protocol: int,
    routes: list[dict[str, Any]],
    supervisor: dict[str, Any] | None = None,
) -> Path:
    doc: dict[str, Any] = {
        "broker": {"host": "127.0.0.1", "port": port, "protocol": 5 if protocol == 5 else "3.1.1"},
        "host_id": "bench",
        "python_path": [str(REPO_ROOT)],
        "control": {"socket": str(path.parent / "control.sock")},
        "logging": {"level": "info", "format": "json"},
        "routes": routes,
    }
    if supervisor:
        doc["supervisor"] = supervisor
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def route(
    name: str,
    topic: str,
    handler: str,
    workers: int = 1,
    *,
    qos: int = 1,
    shared: bool | None = None,
    concurrency: int = 1,
    teardown: str | None = None,
) -> dict[str, Any]:
    shared = workers > 1 if shared is None else shared
    r: dict[str, Any] = {
        "name": name,
        "topic": topic,
        "handler": f"bench.handlers:{handler}",
        "shared": shared,
        "workers": workers,
        "qos": qos,
    }
    if teardown:
        r["teardown"] = f"bench.handlers:{teardown}"
    if shared:
        r["concurrency"] = concurrency
    return r


class LogTail:
    """New JSON events of a daemon's log since the last call, each with ``_at`` (unix time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.buf = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        *lines, self.buf = (self.buf + data).split(b"\n")
        out = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if "timestamp" in event:
                event["_at"] = wall_time(event)
                out.append(event)
        return out


class RouteDaemon:
    """``routemqd run`` for one case (``tests.support.daemon.Daemon``), plus its log events."""

    def __init__(self, manifest: Path, rundir: Path) -> None:
        self.spawned = time.time()
        self.daemon = Daemon(manifest, env={"ROUTEMQD_BENCH_DIR": str(rundir)})
        self.tail = LogTail(self.daemon.log_path)
        self.events: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        return self.daemon.pid

    def status(self) -> dict[str, Any]:
        return self.daemon.status()

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        try:
            return self.daemon.wait_ready(timeout)
        except AssertionError as e:
            raise BenchError(str(e)[:2000]) from None

    def poll_log(self) -> list[dict[str, Any]]:
        new = self.tail.read()
        self.events.extend(new)
        return new

    def named(self, name: str) -> list[dict[str, Any]]:
        self.poll_log()
        return [e for e in self.events if e.get("event") == name]

    def worker_pids(self) -> list[int]:
        return [int(s["pid"]) for s in self.status()["slots"] if s.get("pid")]

    def ready_by_slot(self) -> dict[tuple[str, int], float]:
        """(route, slot) -> unix time its (last) worker was logged ready."""
        return {(str(e["pool"]), int(e["slot"])): e["_at"] for e in self.named("worker_ready")}

    def ready_times(self) -> dict[int, float]:
        """pid -> unix time the master logged the worker ready."""
        return {int(e["pid"]): e["_at"] for e in self.named("worker_ready")}

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self) -> None:
        try:
            rc = self.daemon.stop(STOP_TIMEOUT)
            if rc != 0:
                raise BenchError(f"routemqd exited with {rc}:\n{self.daemon.log_tail()}")
        finally:
            self.daemon.close()

    def close(self) -> None:
        self.daemon.close()


# --------------------------------------------------------------------------- measurements


@dataclass
class HandledTrace:
    """Per-slot ``handled`` counters from ``routemqd status``, kept where they changed.

    Workers report counters in heartbeats once a second, so the counters move in steps; see
    :func:`slot_end` for how the time a slot finished is estimated from them.
    """

    points: dict[tuple[str, int], list[tuple[float, int]]] = field(default_factory=dict)
    total: int = 0
    changed_at: float = 0.0

    def sample(self, status: dict[str, Any], now: float) -> None:
        total = 0
        for s in status["slots"]:
            key = (str(s["route"]), int(s["index"]))
            count = int(s["handled"])
            pts = self.points.setdefault(key, [])
            if not pts or pts[-1][1] != count:
                pts.append((now, count))
            total += count
        if total != self.total:
            self.changed_at = now
        self.total = total

    def pool_rate(self, starts: dict[tuple[str, int], float]) -> float:
        """Sum over the slots of what each handled / the time from its start to its end."""
        total = 0.0
        for key, pts in self.points.items():
            if pts and pts[-1][1] > 0:
                start = starts[key]
                total += pts[-1][1] / (slot_end(pts, start) - start)
        return total

    def end_time(self, start: float) -> float:
        ends = [slot_end(pts, start) for pts in self.points.values() if pts and pts[-1][1] > 0]
        if not ends:
            raise BenchError("no slot handled anything")
        return max(ends)


def slot_end(points: list[tuple[float, int]], start: float) -> float:
    """When the slot handled its last message: after its last step below the final count, at its
    average rate since ``start``; never later than the step that showed the final count."""
    t_final, final = points[-1]
    below = [(t, c) for t, c in points if 0 < c < final]
    if not below:
        return t_final  # finished within one heartbeat: only the upper bound is known
    t1, c1 = below[-1]
    if t1 <= start:
        return t_final
    rate = c1 / (t1 - start)
    return min(t_final, t1 + (final - c1) / rate)


def poll_handled(
    d: RouteDaemon,
    done: Callable[[HandledTrace], bool],
    timeout: float,
    every: float = 0.05,
) -> HandledTrace:
    trace = HandledTrace()
    deadline = time.monotonic() + timeout
    while True:
        now = time.time()
        with contextlib.suppress(OSError):
            trace.sample(d.status(), now)
        if done(trace):
            return trace
        if time.monotonic() >= deadline:
            raise BenchError(f"routemqd handled {trace.total} in {timeout:g} s")
        time.sleep(every)


def read_records(directory: Path, prefix: str) -> list[list[bytes]]:
    out = []
    for path in sorted(directory.glob(f"{prefix}-*.txt")):
        for line in path.read_bytes().splitlines():
            parts = line.split()
            if parts:
                out.append(parts)
    return out


def latencies_ms(directory: Path, prefix: str) -> list[float]:
    return [(int(p[2]) - int(p[1])) / 1e6 for p in read_records(directory, prefix) if len(p) == 3]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def ledger(directory: Path) -> list[tuple[str, int, float, str]]:
    out = []
    for p in read_records(directory, "ledger"):
        if len(p) == 4:
            out.append((p[0].decode(), int(p[1]), float(p[2]), p[3].decode()))
    return out


def wait_ledger(directory: Path, expected: set[str], timeout: float) -> set[str]:
    """Wait until every expected id is in the ledger; returns the missing ones."""
    deadline = time.monotonic() + timeout
    while True:
        missing = expected - {e[0] for e in ledger(directory)}
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)


def longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *sorted(t for t in times if start <= t <= end), end]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (those still running)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def is_child_of(pid: int, parent: int) -> bool:
    try:
        return psutil.Process(pid).ppid() == parent
    except psutil.Error:
        return False


def kill_worker(pid: int, master: int) -> None:
    """SIGKILL a worker, but only while it is still a child of our own daemon's master."""
    if not is_child_of(pid, master):
        raise BenchError(f"pid {pid} is not a worker of master {master}")
    os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------- bench


class Bench:
    """One broker for the whole run, a work directory, and everything still running."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker = Broker(workdir / "broker")
        self.live: list[Closeable] = []
        self.counter = 0

    @property
    def port(self) -> int:
        return self.broker.port

    def start(self) -> None:
        self.broker.start()

    def rundir(self, prefix: str) -> tuple[str, Path]:
        self.counter += 1
        tag = f"{prefix}{self.counter}"
        path = self.workdir / "runs" / tag
        path.mkdir(parents=True)
        return tag, path

    def keep(self, thing: C) -> C:
        self.live.append(thing)
        return thing

    def release(self, thing: Closeable) -> None:
        with contextlib.suppress(ValueError):
            self.live.remove(thing)
        thing.close()

    def publisher(self, rundir: Path, topic: str, **kw: Any) -> Publisher:
        return self.keep(Publisher(self.port, topic, rundir / "publisher.err", **kw))

    def daemon(self, manifest: Path, rundir: Path) -> RouteDaemon:
        return self.keep(RouteDaemon(manifest, rundir))

    def stop_daemon(self, d: RouteDaemon) -> None:
        with contextlib.suppress(ValueError):
            self.live.remove(d)
        d.stop()

    def consumers(self, *args: Any, **kw: Any) -> Consumers:
        return self.keep(Consumers(*args, **kw))

    def close_all(self) -> None:
        while self.live:
            thing = self.live.pop()
            with contextlib.suppress(Exception):
                thing.close()
        with contextlib.suppress(Exception):
            self.broker.stop()
