"""Process mechanics: fork a worker with its two pipes, read its events, signal it, reap it.

Nothing here decides anything; the slot table says what to start and stop, and this module does
it. ``fork``, ``waitpid`` and ``kill`` go through ``ops`` (the ``os`` module unless a test passes
a fake), so the slot table and the loop are tested without forking.

The child side of ``fork()`` is :meth:`ProcessTable._child`: it drops every descriptor of the
master's but its own two pipe ends, resets the master's signals and calls ``child_main`` (which
imports the worker: the master itself never imports worker code or paho, DESIGN invariant 1).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import structlog

from routemqd import log as logsetup
from routemqd import protocol
from routemqd import signals as sigs
from routemqd.board import InflightBoard
from routemqd.exitcodes import ExitCode, describe
from routemqd.plan import SlotSpec
from routemqd.protocol import LineReader, StopMode

# (spec, hold, status_w, command_r, board, attempts) -> exit code; runs in the child
ChildMain = Callable[[SlotSpec, bool, int, int, InflightBoard, dict[bytes, int]], int]


@dataclass
class Proc:
    """One forked worker process, as the master sees it."""

    pid: int
    spec: SlotSpec
    started_at: float
    status_fd: int  # -1 once closed
    command_fd: int  # -1 once closed
    reader: LineReader
    ps: psutil.Process | None
    create_time: float
    held: bool = False  # a replacement that waits for ``connect`` (same session)
    warm: bool = False
    ready_at: float | None = None
    connect_sent: bool = False
    last_heartbeat: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    stats_at: float | None = None  # when ``stats`` arrived: the scaler differences counters
    stop_mode: StopMode | None = None
    stop_reason: str = ""
    stop_deadline: float | None = None
    killed: bool = False
    boot_error: str = ""
    stuck_reported: bool = False  # killed by the master for being stuck or frozen
    session_ended: bool = False  # it said so before exiting (a completed retire)
    cpu_high_since: float | None = None
    rss: int = 0
    cpu: float = 0.0
    board: InflightBoard | None = None  # what it is handling, readable after it dies

    @property
    def label(self) -> dict[str, Any]:
        return {"pool": self.spec.route.name, "slot": self.spec.index, "pid": self.pid}


class ProcessTable:
    """The master's children by PID and by status-pipe descriptor."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        child_main: ChildMain,
        clock: Callable[[], float],
        ops: Any = os,
    ) -> None:
        self.sel = sel
        self.child_main = child_main
        self.clock = clock
        self.ops = ops
        self.log = structlog.get_logger("routemqd.master")
        self.by_pid: dict[int, Proc] = {}
        self.by_fd: dict[int, Proc] = {}
        self.master_pid = os.getpid()
        self.close_in_child: list[int] = []  # the master's own descriptors (signal pipe, sockets)
        self.before_fork: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self.by_pid)

    def __iter__(self) -> Any:
        return iter(list(self.by_pid.values()))

    # ----------------------------------------------------------------------------- fork

    def spawn(self, spec: SlotSpec, hold: bool, attempts: dict[bytes, int]) -> Proc | None:
        """Fork a worker for ``spec``; ``hold``: warm up, then wait for ``connect``."""
        status_r, status_w = os.pipe()
        command_r, command_w = os.pipe()
        board = InflightBoard(spec.route.concurrency)
        self.before_fork()
        logsetup.sink().flush()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = self.ops.fork()
        except OSError as e:
            for fd in (status_r, status_w, command_r, command_w):
                os.close(fd)
            board.close()
            self.log.error("fork_failed", pool=spec.route.name, slot=spec.index, reason=str(e))
            return None
        if pid == 0:  # pragma: no cover - runs in the child
            self._child(spec, hold, status_w, command_r, (status_r, command_w), board, attempts)
        os.close(status_w)
        os.close(command_r)
        os.set_blocking(status_r, False)
        os.set_blocking(command_w, False)
        try:
            ps: psutil.Process | None = psutil.Process(pid)
            create_time = ps.create_time()
        except (psutil.Error, ValueError):
            ps, create_time = None, 0.0
        now = self.clock()
        proc = Proc(
            pid=pid,
            spec=spec,
            started_at=now,
            status_fd=status_r,
            command_fd=command_w,
            reader=LineReader(status_r),
            ps=ps,
            create_time=create_time,
            held=hold,
            last_heartbeat=now,
            board=board,
        )
        self.by_pid[pid] = proc
        self.by_fd[status_r] = proc
        self.sel.register(status_r, selectors.EVENT_READ, "worker")
        self.log.info("worker_spawned", **proc.label, hold=hold or None)
        return proc

    def _child(
        self,
        spec: SlotSpec,
        hold: bool,
        status_w: int,
        command_r: int,
        parent_ends: tuple[int, ...],
        board: InflightBoard,
        attempts: dict[bytes, int],
    ) -> None:  # pragma: no cover - runs in the child
        code = int(ExitCode.CRASH)
        try:
            sigs.reset_in_child()
            keep = {status_w, command_r, 0, 1, 2}
            close = [*parent_ends, *self.close_in_child]
            close += [p.status_fd for p in self.by_pid.values() if p.status_fd >= 0]
            close += [p.command_fd for p in self.by_pid.values() if p.command_fd >= 0]
            with contextlib.suppress(Exception):
                close.append(self.sel.fileno())  # type: ignore[attr-defined]
            for fd in close:
                if fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            code = self.child_main(spec, hold, status_w, command_r, board, attempts)
        except BaseException:
            code = int(ExitCode.CRASH)
        finally:
            os._exit(code)

    # --------------------------------------------------------------------------- pipes

    def read(self, proc: Proc) -> list[dict[str, Any]]:
        """What the worker wrote since the last call; closes its pipes at EOF."""
        if proc.status_fd < 0:
            return []  # closed at EOF: its number may already be another worker's pipe
        events = list(proc.reader.read())
        if proc.reader.eof:
            self.close_pipes(proc)
        return events

    def close_pipes(self, proc: Proc) -> None:
        """Closes both pipes and forgets their numbers. A worker's status pipe reaches EOF as it
        exits, which can be a loop pass before waitpid() reports it; a fork in between may get
        the same descriptor number, and the reap must not read that pipe as this worker's last
        words (it would swallow the new worker's READY)."""
        if proc.status_fd >= 0:
            if self.by_fd.get(proc.status_fd) is proc:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(proc.status_fd)
                del self.by_fd[proc.status_fd]
            with contextlib.suppress(OSError):
                os.close(proc.status_fd)
            proc.status_fd = -1
        if proc.command_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(proc.command_fd)
            proc.command_fd = -1

    def command(self, proc: Proc, cmd: protocol.Command, **args: Any) -> bool:
        """Send one command; False when its pipe is closed (then only signals reach it)."""
        if proc.command_fd < 0:
            return False
        with contextlib.suppress(OSError):
            protocol.write_event(proc.command_fd, {"cmd": cmd, **args})
        return True

    # ------------------------------------------------------------------------- signals

    def signal(self, proc: Proc, sig: int) -> None:
        if not same_process(proc):
            return  # already gone, or the PID now belongs to someone else
        with contextlib.suppress(ProcessLookupError):
            self.ops.kill(proc.pid, sig)

    def kill(self, proc: Proc) -> None:
        proc.killed = True
        self.signal(proc, signal.SIGKILL)

    # ---------------------------------------------------------------------------- reap

    def reap(self) -> list[tuple[Proc, int, list[dict[str, Any]]]]:
        """Every exited child at once: (proc, wait status, its last words) for ours."""
        out = []
        while True:
            try:
                pid, status = self.ops.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return out
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return out
            if pid == 0:
                return out
            proc = self.by_pid.pop(pid, None)
            if proc is None:
                self.log.info("unknown_child_reaped", pid=pid, status=describe_status(status))
                continue
            last = self.read(proc)
            self.close_pipes(proc)
            out.append((proc, status, last))


def same_process(proc: Proc) -> bool:
    """True when ``proc.pid`` still names the process we forked (not a reused PID)."""
    try:
        return proc.ps is not None and proc.ps.create_time() == proc.create_time
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def describe_status(status: int) -> str:
    """A wait status for logs: ``killed by SIGKILL``, ``exit 9``, ``handler_import_failed``."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return describe(code)


def is_boot_failure(code: int) -> bool:
    try:
        return ExitCode(code).is_boot_failure
    except ValueError:
        return False
