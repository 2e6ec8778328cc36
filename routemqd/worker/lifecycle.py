"""The process in one slot, from fork to exit: boot, connect, serve, stop.

Threads, each with one job:
- the socket thread (``drivers``) reads the socket and runs sync handlers inline (concurrency 1)
  or an event loop with async handlers; it alone acknowledges (``delivery``);
- pool runner threads, only for sync handlers with concurrency > 1;
- the main thread (here) talks to the master: commands in, ``ready`` and heartbeats out; it
  notices a handler stuck past its deadline and reports its stack, and keeps the connection alive
  while a handler holds the socket thread (``Link.keep_alive_if_starved``).

The route's hooks run on the main thread, with no socket thread alive: ``setup`` after the
handler and hooks imported and before connecting (``_booted``: a setup that fails never
subscribes, and a replacement that fails never displaces the worker it was to replace, since
``warm`` follows it), ``teardown`` after the last PUBACK went out and the DISCONNECT was sent
(``_drained``). An async route's event loop is made here so both run on the loop the handler
runs on; it is closed after teardown.

Exit codes are named in :mod:`routemqd.exitcodes`: the master tells a crash from a boot failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import selectors
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

import structlog

from routemqd import log as logsetup
from routemqd import protocol
from routemqd.board import InflightBoard
from routemqd.context import WorkerContext, make_context
from routemqd.exitcodes import ExitCode
from routemqd.handlers import HandlerError, LoadedHandler, load_handler
from routemqd.hooks import HookFailure, RouteHooks, load_route_hooks, run_setup, run_teardown
from routemqd.plan import SlotSpec
from routemqd.protocol import Command, Event, StopMode
from routemqd.worker import hookrun, stats
from routemqd.worker.consumer import Consumer

HEARTBEAT_INTERVAL = 1.0
BEATS_PER_TIMEOUT = 4  # heartbeats a worker sends within its route's heartbeat_timeout, at least
IDLE_BEAT_AFTER = 0.1  # an extra heartbeat this long after the last message, once work stops
PR_SET_PDEATHSIG = 1
BOOT_FAILURE = "boot_failure"


def beat_interval(heartbeat_timeout: float) -> float:
    """Seconds between heartbeats. Once a second, unless the route's ``heartbeat_timeout`` is so
    short that a second's beat would leave no slack: the master judges a worker frozen after that
    much silence, so a healthy worker must beat several times within it, or a scheduling delay of
    a few milliseconds gets it killed."""
    return min(HEARTBEAT_INTERVAL, heartbeat_timeout / BEATS_PER_TIMEOUT)


def until_next_beat(interval: float) -> float:
    """Seconds to the next wall-clock heartbeat tick. Every worker beats on the same tick, so the
    master reads a whole pool's heartbeats in one wake-up instead of one wake-up per worker."""
    return interval - (time.time() % interval)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal us when the master dies, so a worker never outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent-pid check in the main loop still catches it


class Worker:
    def __init__(
        self,
        spec: SlotSpec,
        status_fd: int,
        command_fd: int | None = None,
        parent_pid: int | None = None,
        board: InflightBoard | None = None,
        attempts: Mapping[bytes, int] | None = None,
    ) -> None:
        self.spec = spec
        self.route = spec.route
        self.status_fd = status_fd
        self.command_fd = command_fd
        self.parent_pid = parent_pid
        self.board = board
        self.attempts = attempts
        # every event of this process names its slot, whichever thread logs it (handlers too)
        logsetup.set_process_fields(pool=spec.route.name, slot=spec.index, pid=os.getpid())
        self.log = structlog.get_logger("routemqd.worker")
        self.handler: LoadedHandler | None = None
        self.hooks = RouteHooks()
        self.context: WorkerContext | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # an async route's, from boot to exit
        self.consumer: Consumer | None = None
        self.boot_failure: tuple[ExitCode, str] | None = None
        self.stop_mode: str | None = None
        self.connect_allowed = False
        self.ready_sent = False
        self._beat_received = 0  # ``received`` in the last heartbeat
        self._beat_problem = ""  # the link's ``problem`` in the last heartbeat
        self._beat_every = beat_interval(self.route.heartbeat_timeout)
        self._emit_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    @property
    def states(self) -> list[stats.RunnerState]:
        return self.consumer.states if self.consumer is not None else []

    # ------------------------------------------------------------------------ lifecycle

    def main(self, hold: bool = False) -> int:
        self._install_signals()
        self.context = make_context(self.spec)
        try:
            self.handler = load_handler(self.route.handler, self.spec.python_path)
            self.hooks = load_route_hooks(self.route, self.spec.python_path, self.handler.is_async)
        except HandlerError as e:
            code = (
                ExitCode.HANDLER_IMPORT_FAILED if e.kind == "import" else ExitCode.HANDLER_INVALID
            )
            self.log.error("handler_unusable", reason=str(e), detail=e.detail or None)
            self._emit({"t": Event.BOOT_ERROR, "code": int(code), "reason": str(e)})
            return int(code)
        if self.handler.is_async:
            self.loop = asyncio.new_event_loop()
        failure = self._booted()
        if failure is not None:
            self._hook_failed(failure)
            return int(failure.code)
        _freeze_heap()
        self._emit({"t": Event.WARM})
        self.connect_allowed = not hold
        return self._shutdown(self._serve())

    def _booted(self) -> HookFailure | None:
        """Booted, before connect: the handler and hooks are imported, nothing is subscribed.
        Runs the route's ``setup``, heartbeating meanwhile: the master judges a silent worker
        frozen after ``heartbeat_timeout``, and a slow setup is bounded by ``setup_timeout``
        instead (its watchdog reports ``boot_error`` and ends the process)."""
        if self.hooks.setup is None:
            return None
        assert self.context is not None
        with hookrun.beating(self._heartbeat, self._until_next_beat):
            return run_setup(
                self.hooks.setup,
                self.context,
                self.route.setup_timeout,
                loop=self.loop,
                on_timeout=self._hook_failed,
            )

    def _drained(self) -> None:
        """Drained and disconnected: the last in-flight message was acknowledged, its PUBACK
        written before the DISCONNECT, and no socket thread is left. Runs the route's
        ``teardown`` (a hang past ``teardown_timeout`` ends the process with its own code; one
        that raises is logged, and the stop is still clean), then closes an async route's loop."""
        if self.hooks.teardown is not None:
            assert self.context is not None
            failure = run_teardown(
                self.hooks.teardown,
                self.context,
                self.route.teardown_timeout,
                loop=self.loop,
                on_timeout=self._hook_failed,
            )
            if failure is not None:
                self._hook_failed(failure)
        if self.loop is not None and not self.loop.is_running():
            self.loop.close()

    def _hook_failed(self, failure: HookFailure) -> None:
        hookrun.report(failure, self.log, self._emit)

    def _serve(self) -> str:
        """The main thread's loop: commands, signals, heartbeats, deadlines. Returns a stop mode."""
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        reader = None
        if self.command_fd is not None:
            os.set_blocking(self.command_fd, False)
            reader = protocol.LineReader(self.command_fd)
            sel.register(self.command_fd, selectors.EVENT_READ, "command")
        next_beat = time.monotonic()
        try:
            while self.stop_mode is None and self.boot_failure is None:
                if self.connect_allowed and self.consumer is None:
                    assert self.handler is not None
                    self.consumer = Consumer(
                        self.spec,
                        self.handler,
                        self,
                        self.log,
                        self.board,
                        self.attempts,
                        middleware=[m.func for m in self.hooks.middleware],
                        loop=self.loop,
                    )
                    self.consumer.start()
                    if self.boot_failure is not None:
                        break
                timeout = max(0.0, next_beat - time.monotonic())
                if self.consumer is not None and self.consumer.received != self._beat_received:
                    timeout = min(timeout, IDLE_BEAT_AFTER)
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        self._drain_wake()
                    elif reader is not None:
                        for cmd in reader.read():
                            self._command(cmd)
                        if reader.eof:
                            self.log.warning("master_gone", reason="command pipe closed")
                            sel.unregister(self.command_fd)
                            self.stop_mode = self.stop_mode or protocol.STOP_KEEP
                consumer = self.consumer
                if consumer is not None and consumer.subscribed and not self.ready_sent:
                    self.ready_sent = True
                    # beat first: the master then never holds a ready worker whose last
                    # heartbeat is one from before the CONNACK, saying "not connected"
                    self._heartbeat(time.monotonic())
                    self._emit({"t": Event.READY})
                    self.log.info("subscribed", filter=self.route.subscription)
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    self.log.warning("master_gone", reason="parent changed")
                    self.stop_mode = protocol.STOP_KEEP
                now = time.monotonic()
                if consumer is not None and consumer.link is not None:
                    consumer.link.keep_alive_if_starved(now)
                if now >= next_beat or self._went_idle(now) or self._problem_changed():
                    self._heartbeat(now)
                    next_beat = now + self._until_next_beat()
        finally:
            sel.close()
        if self.boot_failure is not None:
            return BOOT_FAILURE
        return self.stop_mode or protocol.STOP_KEEP

    def _command(self, cmd: dict[str, Any]) -> None:
        kind = cmd.get("cmd")
        if kind == Command.CONNECT:
            self.connect_allowed = True
        elif kind == Command.REOPEN_LOGS:
            logsetup.sink().reopen()  # our copy of the log file, inherited through fork
            # in the new file, so whoever rotated it sees that this worker writes there now
            self.log.info("log_reopened")
        elif kind == Command.STOP:
            mode = cmd.get("mode")
            known = mode in (StopMode.KEEP, StopMode.RETIRE)
            self.stop_mode = StopMode(mode) if known else StopMode.KEEP

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGUSR2, self._on_signal)
        # A terminal's Ctrl-C / Ctrl-\ / hangup reach the whole process group: the master
        # decides how its workers stop, so they ignore these.
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if self.parent_pid is None:  # `routemqd worker` alone in a terminal: Ctrl-C stops it
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only record the wish; the main loop acts on it (woken by the wakeup fd).
        if self.stop_mode is None:
            self.stop_mode = (
                protocol.STOP_RETIRE if signum == signal.SIGUSR2 else protocol.STOP_KEEP
            )

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _emit(self, event: dict[str, Any]) -> None:
        # one writer at a time: a helper thread beats during setup and the stop, and a line
        # over PIPE_BUF (a stuck handler's stack) is not written atomically
        with self._emit_lock:
            written = protocol.write_event(self.status_fd, event)
        if not written and self.stop_mode is None:
            self.stop_mode = protocol.STOP_KEEP  # the master is gone

    def boot_fail(self, code: ExitCode, reason: str) -> None:
        if self.boot_failure is None:
            self.boot_failure = (code, reason)
            self.log.error("worker_boot_failed", reason=reason, code=code.name.lower())
            self._emit({"t": Event.BOOT_ERROR, "code": int(code), "reason": reason})
        self.wake()

    # -------------------------------------------------------------------- reporting

    def _went_idle(self, now: float) -> bool:
        """Work just stopped: the counters are final, so report them now rather than at the next
        tick (``routemqd status`` and the benchmarks see a drained backlog at once)."""
        c = self.consumer
        return (
            c is not None
            and c.received != self._beat_received
            and now - c.last_message_at >= IDLE_BEAT_AFTER
            and all(s.busy_since is None for s in c.states)
            and (c.runner is None or c.runner.queued() == 0)
        )

    def _problem_changed(self) -> bool:
        c = self.consumer
        return c is not None and c.link is not None and c.link.problem != self._beat_problem

    def _until_next_beat(self) -> float:
        return until_next_beat(self._beat_every)

    def _heartbeat(self, now: float) -> None:
        busy_for, busy = stats.busiest(self.states, now)
        deadline = self.route.handler_timeout or self.route.heartbeat_timeout
        if busy is not None and busy_for > deadline and not busy.stuck_reported:
            busy.stuck_reported = True
            stack = _stack_of(busy.busy_thread)
            self.log.error(
                "handler_stuck", topic=busy.busy_topic, busy_for=round(busy_for, 1), stack=stack
            )
            self._emit(
                {
                    "t": Event.STUCK,
                    "topic": busy.busy_topic,
                    "busy_for": busy_for,
                    "stack": stack[-3000:],
                }
            )
        c = self.consumer
        self._beat_received = c.received if c is not None else 0
        self._beat_problem = c.link.problem if c is not None and c.link is not None else ""
        window = max(1, self.route.concurrency + self.route.prefetch)
        unacked = c.acks.unacked if c is not None and c.acks is not None else 0
        self._emit(
            {
                "t": Event.HEARTBEAT,
                "received": c.received if c is not None else 0,
                "dropped": c.dropped if c is not None else 0,
                "redelivered": c.redelivered if c is not None else 0,
                "queued": c.runner.queued() if c is not None and c.runner is not None else 0,
                "connected": c is not None and c.link is not None and c.link.connected,
                "broker_problem": c.link.problem if c is not None and c.link is not None else "",
                "busy_for": round(busy_for, 3),
                "busy_topic": busy.busy_topic if busy is not None else "",
                **stats.totals(self.states, now),
                "resolved": stats.take_resolved(self.states),
                "unacked": unacked,
                "window_full": unacked >= window,
            }
        )

    # ---------------------------------------------------------------------- shutdown

    def _shutdown(self, mode: str) -> int:
        deadline = time.monotonic() + max(0.5, self.spec.graceful_timeout - 1.0)
        c = self.consumer
        if mode == BOOT_FAILURE:
            assert self.boot_failure is not None
            if c is not None:
                c.stopping = True
                c.close(end_session=False, deadline=time.monotonic() + 1.0)
            return int(self.boot_failure[0])
        # beating on: the master kills a stopping worker that falls silent (frozen) instead of
        # waiting out graceful_timeout, while a slow drain is bounded by the deadline
        with hookrun.beating(self._heartbeat, self._until_next_beat):
            if c is not None and c.link is not None:
                self.log.info("worker_stopping", mode=mode)
                end_session = mode == protocol.STOP_RETIRE and c.retire(deadline)
                c.accepting = False
                c.drain(deadline)
                c.stopping = True
                if c.close(end_session=end_session, deadline=deadline + 1.0):
                    # the master forgets a retired slot only once its session is gone; without
                    # this word it starts another worker to resume the session and retire it
                    self._emit({"t": Event.SESSION_ENDED})
            self._drained()  # also when stopped before connecting: setup ran all the same
        if c is not None and c.link is not None:
            self.log.info("worker_stopped", mode=mode, handled=sum(s.handled for s in self.states))
        return int(ExitCode.OK)


def _freeze_heap() -> None:
    """Everything imported and set up so far lives as long as the worker: move it out of the
    garbage collector's sight. A full collection otherwise walks paho, structlog, yaml, psutil
    and the handler's modules every few thousand messages, stalling the socket thread for tens
    of milliseconds (the largest delays the latency benchmark saw). No collection first: it
    would cost a restart ~15 ms, and the master froze what the worker inherited already
    (``daemon.preload_worker_code``)."""
    gc.freeze()


def _stack_of(thread_id: int | None) -> str:
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    return "".join(traceback.format_stack(frame)) if frame is not None else ""


def run(
    spec: SlotSpec,
    status_fd: int,
    command_fd: int | None = None,
    hold: bool = False,
    parent_pid: int | None = None,
    board: InflightBoard | None = None,
    attempts: Mapping[bytes, int] | None = None,
) -> int:
    """Run one slot's worker until told to stop; returns an ExitCode value."""
    worker = Worker(spec, status_fd, command_fd, parent_pid, board, attempts)
    try:
        return worker.main(hold=hold)
    except Exception as e:
        worker.log.error(
            "worker_crashed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
        )
        return int(ExitCode.CRASH)
