"""Fakes for the master side: a clock, a process table that never forks, manifests and specs."""

from __future__ import annotations

import random
from typing import Any

import yaml

from routemqd.board import InflightBoard
from routemqd.manifest import Manifest, loads
from routemqd.plan import SlotSpec, slots_for
from routemqd.procs import Proc
from routemqd.protocol import Command
from routemqd.slottable import SlotTable

SIGKILLED = 9  # a wait status: killed by SIGKILL


def exited(code: int) -> int:
    """The wait status of a process that exited with ``code``."""
    return code << 8


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def manifest(routes: list[dict[str, Any]] | None = None, **supervisor: Any) -> Manifest:
    doc = {
        "routes": routes or [{"name": "r", "topic": "r/{n}", "handler": "m:f"}],
        "supervisor": {
            "backoff_initial": 0.1,
            "backoff_max": 5,
            "healthy_after": 10,
            "failure_limit": 5,
            "failure_window": 60,
            "failed_cooldown": 60,
            **supervisor,
        },
    }
    return loads(yaml.safe_dump(doc), "<fake>", environ={})


def specs(m: Manifest) -> list[SlotSpec]:
    return list(slots_for(m).values())


class FakeProcs:
    """What the slot table asks of a process table, recorded; ``spawn`` never forks."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.next_pid = 100
        self.fail_fork = False
        self.spawned: list[Proc] = []
        self.attempts_given: list[dict[bytes, int]] = []
        self.commands: list[tuple[int, str, dict[str, Any]]] = []
        self.signals: list[tuple[int, int]] = []
        self.killed: list[int] = []
        self.pipe_closed: set[int] = set()

    def spawn(self, spec: SlotSpec, hold: bool, attempts: dict[bytes, int]) -> Proc | None:
        if self.fail_fork:
            return None
        pid = self.next_pid
        self.next_pid += 1
        now = self.clock()
        proc = Proc(
            pid=pid,
            spec=spec,
            started_at=now,
            status_fd=-1,
            command_fd=-1,
            reader=None,  # type: ignore[arg-type]
            ps=None,
            create_time=0.0,
            held=hold,
            last_heartbeat=now,
            board=InflightBoard(spec.route.concurrency),
        )
        self.spawned.append(proc)
        self.attempts_given.append(dict(attempts))
        return proc

    def command(self, proc: Proc, cmd: Command, **args: Any) -> bool:
        if proc.pid in self.pipe_closed:
            return False
        self.commands.append((proc.pid, str(cmd), args))
        return True

    def signal(self, proc: Proc, sig: int) -> None:
        self.signals.append((proc.pid, sig))

    def kill(self, proc: Proc) -> None:
        proc.killed = True
        self.killed.append(proc.pid)

    def sent(self, proc: Proc) -> list[tuple[str, dict[str, Any]]]:
        return [(c, a) for pid, c, a in self.commands if pid == proc.pid]


class Harness:
    """A slot table on a fake clock and fake processes, with helpers to play a worker's part."""

    def __init__(self, m: Manifest | None = None, seed: int = 0) -> None:
        self.manifest = m or manifest()
        self.clock = Clock()
        self.procs = FakeProcs(self.clock)
        self.table = SlotTable(self.procs, lambda: self.manifest.supervisor, random.Random(seed))
        for spec in specs(self.manifest):
            self.table.add(spec, self.clock())

    @property
    def now(self) -> float:
        return self.clock()

    def slot(self, route: str = "r", index: int = 0) -> Any:
        return self.table.slots[(route, index)]

    def reconcile(self) -> None:
        self.table.reconcile(self.now)

    def event(self, proc: Proc, kind: str, **fields: Any) -> None:
        self.table.on_event(proc, {"t": kind, **fields}, self.now)

    def ready(self, proc: Proc) -> None:
        self.event(proc, "ready")

    def exit(self, proc: Proc, status: int = exited(1)) -> None:
        self.table.on_exit(proc, status, self.now)

    def retired(self, proc: Proc) -> None:
        """A retiring worker that left the group, ended its session and exited."""
        self.event(proc, "session_ended")
        self.exit(proc, 0)

    def start_ready(self, route: str = "r", index: int = 0) -> Proc:
        self.reconcile()
        proc = self.slot(route, index).proc
        assert proc is not None
        self.ready(proc)
        return proc

    def crash_holding(self, proc: Proc, digest: bytes, status: int = exited(13)) -> None:
        """The worker dies with ``digest`` on its in-flight board."""
        assert proc.board is not None
        proc.board.set(0, digest)
        self.exit(proc, status)
