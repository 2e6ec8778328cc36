"""The master: one loop that forks a worker per slot, watches them, and restarts them.

Shaped like gunicorn's arbiter: signal handlers do nothing but wake the loop (Python writes the
signal number to a wakeup pipe); the loop reads signals and worker pipes, dispatches
``handle_<signal>``, reaps children, checks health, and reconciles every slot with what it should
be. There is no other thread, so ``fork()`` is always safe, and there is exactly one place that
restarts a worker: :meth:`Master.reconcile`.

The master never imports handler code and never talks MQTT (DESIGN invariant 1): a fork imports the
handler in the child, so a handler that fails to import, leaks or segfaults hurts only its slot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import selectors
import signal
import sys
import time
from typing import Any

import psutil
import structlog

from routemqd import log as logsetup
from routemqd import protocol
from routemqd.board import AttemptLedger, InflightBoard
from routemqd.exitcodes import ExitCode, describe
from routemqd.health import Action, assess, same_process, sample
from routemqd.manifest import Manifest, ManifestError, load
from routemqd.notify import NOTIFY_ENV_VARS, Notifier, watchdog_interval
from routemqd.pidfile import PidFile, PidFileError
from routemqd.plan import SlotSpec, diff, slots_for, summarize
from routemqd.slots import Proc, Slot, State, after_exit

STARTUP_READY_TIMEOUT = 30.0  # tell systemd READY even if the broker is not there yet
MAX_LOOP_SLEEP = 1.0
PASS_EVERY = 0.5  # the slot passes run at least this often, and at once after any change

_HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGUSR1,
)
_SIGNAL_NAMES = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGCHLD: "chld",
    signal.SIGUSR1: "usr1",
}


class AlreadyRunning(Exception):
    """Another routemqd answers on our control socket."""


class Master:
    def __init__(self, manifest: Manifest, socket_path: str | None = None) -> None:
        self.manifest = manifest
        self.log = structlog.get_logger("routemqd.master")
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.slots: dict[tuple[str, int], Slot] = {}
        self.by_pid: dict[int, tuple[Slot, Proc]] = {}
        self.by_fd: dict[int, Proc] = {}
        self.attempts: dict[str, AttemptLedger] = {}  # per pool: messages that killed workers
        self.sel = selectors.DefaultSelector()
        self.rng = random.Random()
        self.notifier = Notifier.from_env()
        self.watchdog_every = watchdog_interval()
        self.next_watchdog = 0.0
        self.next_health = 0.0
        self.ready_notified = False
        self.reload_ready_due: float | None = None  # READY=1 owed to systemd after a reload
        self.status_line = ""
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.exit_code = 0
        self.reload_requested = False
        self.draining = False  # retire-host mode: retire every slot once, then exit
        self.dirty = True  # something besides a heartbeat happened: run the slot passes
        self.last_reload: dict[str, Any] = {"ok": True, "at": None, "error": None, "summary": None}
        self.socket_path = socket_path or manifest.control.socket
        self.control: Any = None
        self.metrics: Any = None
        self.extra_fds: list[int] = []  # listening sockets etc., closed in every child
        self._sig_r, self._sig_w = os.pipe()
        for fd in (self._sig_r, self._sig_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    # ---------------------------------------------------------------------------- set-up

    def install_signals(self) -> None:
        """Before anything is forked: a signal that arrives during start-up waits in the pipe."""
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in _HANDLED_SIGNALS:
            signal.signal(sig, _wake_only)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self.sel.register(self._sig_r, selectors.EVENT_READ, "signals")
        # `routemqd run` blocked these at start-up; what arrived meanwhile is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)

    def start_services(self) -> None:
        from routemqd.control import ControlServer
        from routemqd.metrics import MetricsServer

        try:
            self.control = ControlServer(self.socket_path, self.manifest.control.mode, self)
            self.sel.register(self.control.fileno(), selectors.EVENT_READ, "control")
            self.extra_fds.append(self.control.fileno())
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                # Another master with this manifest: its workers use the same client ids, and
                # two clients on one id kick each other off forever. Refuse to start.
                raise AlreadyRunning(str(e)) from None
            self.log.error("control_socket_unavailable", path=self.socket_path, reason=str(e))
        if self.manifest.metrics is not None:
            try:
                self.metrics = MetricsServer(self.manifest.metrics, self)
                self.sel.register(self.metrics.fileno(), selectors.EVENT_READ, "metrics")
                self.extra_fds.append(self.metrics.fileno())
            except OSError as e:
                self.log.error(
                    "metrics_unavailable",
                    listen=f"{self.manifest.metrics.host}:{self.manifest.metrics.port}",
                    reason=str(e),
                )

    def stop_services(self) -> None:
        for server in (self.control, self.metrics):
            if server is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(server.fileno())
                server.close()

    # ------------------------------------------------------------------------------ loop

    def run(self) -> int:
        if not self.slots:
            for spec in slots_for(self.manifest).values():
                self.slots[spec.key] = Slot(spec=spec)
        self.log.info(
            "master_started",
            pid=self.pid,
            manifest=self.manifest.path,
            routes=len(self.manifest.routes),
            slots=len(self.slots),
        )
        for warning in self.manifest.warnings:
            self.log.warning("manifest_warning", reason=warning)
        # Most wake-ups are heartbeats, one per worker per second: they only update that worker's
        # numbers. The passes over every slot run when something else happened (a signal, an exit,
        # a worker event, a timer, a control request) and at least every PASS_EVERY seconds, so
        # the master's cost does not grow with slots x heartbeats.
        next_pass = 0.0
        wake_at = 0.0
        while True:
            now = time.monotonic()
            if self.dirty or now >= next_pass:
                self.dirty = False
                next_pass = now + PASS_EVERY
                self.reconcile(now)
                if not self.by_pid and (self.shutting_down or (self.draining and not self.slots)):
                    break
                self._enforce_stop_deadlines(now)
                if self.reload_requested and not self.shutting_down and not self._replacing():
                    self.reload_requested = False
                    self.reload()
                self._notify(now)
                wake_at = now + self._next_timeout(now)
            timeout = max(0.0, min(wake_at, next_pass) - time.monotonic())
            events = self.sel.select(timeout)
            for key, _ in events:
                self._dispatch(key)
            if self.reap():
                self.dirty = True
            now = time.monotonic()
            if now >= wake_at:
                self.dirty = True  # a backoff, stop deadline or watchdog timer is due
            if now >= self.next_health:
                self.check_health(now)
                self.next_health = now + self.manifest.supervisor.health_interval
                self.dirty = True
        self.notifier.stopping()
        self.log.info("master_stopped", pid=self.pid, exit_code=self.exit_code)
        return self.exit_code

    def _next_timeout(self, now: float) -> float:
        wake = [now + MAX_LOOP_SLEEP, self.next_health]
        for slot in self.slots.values():
            if (
                slot.proc is None
                and slot.incoming is None
                and slot.state in (State.BACKOFF, State.FAILED)
            ):
                wake.append(slot.next_start_at)
        for _, proc in self.by_pid.values():
            if proc.stop_deadline is not None:
                wake.append(proc.stop_deadline)
        if self.watchdog_every:
            wake.append(self.next_watchdog)
        return max(0.0, min(wake) - now)

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        if key.data != "worker":
            self.dirty = True
        if key.data == "signals":
            try:
                data = os.read(self._sig_r, 4096)
            except BlockingIOError:
                return
            for signum in data:
                name = _SIGNAL_NAMES.get(signal.Signals(signum) if signum else 0)
                if name is not None:
                    getattr(self, f"handle_{name}")()
        elif key.data == "worker":
            proc = self.by_fd.get(key.fd)
            if proc is not None:
                self._read_worker(proc)
        elif key.data == "control":
            self.control.accept(self.sel)
        elif key.data == "metrics":
            self.metrics.accept()
        elif callable(key.data):
            key.data()

    # ---------------------------------------------------------------------------- signals

    def handle_term(self) -> None:
        self.begin_shutdown("SIGTERM")

    def handle_int(self) -> None:
        self.begin_shutdown("SIGINT")

    def handle_quit(self) -> None:
        self.log.warning("quick_shutdown", reason="SIGQUIT")
        self.shutting_down = True
        self.notifier.stopping()
        for _, proc in list(self.by_pid.values()):
            self._signal(proc, signal.SIGKILL)

    def handle_hup(self) -> None:
        self.reload_requested = True
        self.log.info("reload_requested", reason="SIGHUP")

    def handle_chld(self) -> None:
        pass  # the loop reaps after every wake-up

    def handle_usr1(self) -> None:
        logsetup.sink().reopen()
        # Workers hold their own copy of the old file (inherited at fork): ask them to reopen too.
        for _, proc in list(self.by_pid.values()):
            self.command(proc, cmd="reopen_logs")
        self.log.info("log_reopened", workers=len(self.by_pid))

    def begin_shutdown(self, reason: str, mode: str | None = None) -> None:
        """Graceful stop. ``keep``: sessions stay and queue for this host's return (a restart);
        ``retire``: every slot leaves its group and ends its session (a host removed for good)."""
        now = time.monotonic()
        if self.shutting_down:
            # A second request: stop waiting for in-flight work.
            self.shutdown_deadline = min(self.shutdown_deadline, now + 1.0)
            for _, proc in self.by_pid.values():
                if proc.stop_deadline is not None:
                    proc.stop_deadline = min(proc.stop_deadline, now + 1.0)
            self.log.warning("shutdown_hurried", reason=reason)
            return
        self.shutting_down = True
        self.shutdown_deadline = now + self.manifest.supervisor.graceful_timeout
        self.notifier.stopping()
        mode = mode or self.manifest.supervisor.stop_mode
        self.log.info(
            "shutdown_started",
            reason=reason,
            mode=mode,
            workers=len(self.by_pid),
            graceful_timeout=self.manifest.supervisor.graceful_timeout,
        )
        for slot in self.slots.values():
            for proc in slot.live:
                # a held replacement never connected: it has no session to retire
                held = proc is slot.incoming and proc.held and not proc.connect_sent
                proc_mode = protocol.STOP_KEEP if held else mode
                self.stop(proc, proc_mode, "shutdown", self.manifest.supervisor.graceful_timeout)

    # ------------------------------------------------------------------------ spawning

    def spawn(self, slot: Slot, spec: SlotSpec, hold: bool) -> Proc | None:
        """Fork a worker for ``spec``; ``hold``: warm up, wait for ``connect`` (session replace)."""
        status_r, status_w = os.pipe()
        command_r, command_w = os.pipe()
        board = InflightBoard(spec.route.concurrency)
        attempts = self.attempts.setdefault(spec.route.name, AttemptLedger()).snapshot()
        logsetup.sink().flush()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            for fd in (status_r, status_w, command_r, command_w):
                os.close(fd)
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
        except psutil.Error:
            ps, create_time = None, 0.0
        now = time.monotonic()
        proc = Proc(
            pid=pid,
            spec=spec,
            started_at=now,
            status_fd=status_r,
            command_fd=command_w,
            reader=protocol.LineReader(status_r),
            ps=ps,
            create_time=create_time,
            held=hold,
            last_heartbeat=now,
            board=board,
        )
        self.by_pid[pid] = (slot, proc)
        self.by_fd[status_r] = proc
        self.sel.register(status_r, selectors.EVENT_READ, "worker")
        self.log.info(
            "worker_spawned", pool=spec.route.name, slot=spec.index, pid=pid, hold=hold or None
        )
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
            signal.set_wakeup_fd(-1)
            for sig in _HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGUSR2, signal.SIG_DFL)
            from routemqd.worker import set_parent_death_signal

            set_parent_death_signal(signal.SIGTERM)
            if os.getppid() != self.pid:
                os._exit(int(ExitCode.PARENT_GONE))
            keep = {status_w, command_r, 0, 1, 2}
            close = [*parent_ends, self._sig_r, self._sig_w, *self.extra_fds]
            close += [p.status_fd for _, p in self.by_pid.values()]
            close += [p.command_fd for _, p in self.by_pid.values()]
            with contextlib.suppress(Exception):
                close.append(self.sel.fileno())  # type: ignore[attr-defined]
            for fd in close:
                if fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.notifier.forget()
            for var in NOTIFY_ENV_VARS:
                os.environ.pop(var, None)
            _set_title(f"routemqd: worker {spec.label}")
            from routemqd.worker import run

            code = run(
                spec,
                status_w,
                command_r,
                hold=hold,
                parent_pid=self.pid,
                board=board,
                attempts=attempts,
            )
        except BaseException:
            code = int(ExitCode.CRASH)
        finally:
            os._exit(code)

    # ------------------------------------------------------------------------ worker events

    def _read_worker(self, proc: Proc) -> None:
        for event in proc.reader.read():
            kind = event.get("t")
            now = time.monotonic()
            if kind != "hb":
                self.dirty = True
            if kind == "hb":
                proc.last_heartbeat = now
                proc.stats = event
                if event.get("resolved"):
                    ledger = self.attempts.get(proc.spec.route.name)
                    if ledger is not None:
                        ledger.resolve([bytes.fromhex(d) for d in event["resolved"]])
            elif kind == "ready":
                proc.last_heartbeat = now
                if proc.ready_at is None:
                    proc.ready_at = now
                    self.log.info(
                        "worker_ready",
                        pool=proc.spec.route.name,
                        slot=proc.spec.index,
                        pid=proc.pid,
                        startup_ms=round((now - proc.started_at) * 1000, 1),
                    )
            elif kind == "warm":
                proc.warm = True
                proc.last_heartbeat = now
            elif kind == "boot_error":
                proc.boot_error = str(event.get("reason", ""))
            elif kind == "stuck":
                self.log.error(
                    "worker_stuck",
                    pool=proc.spec.route.name,
                    slot=proc.spec.index,
                    pid=proc.pid,
                    topic=event.get("topic"),
                    busy_for=event.get("busy_for"),
                    stack=event.get("stack"),
                )
        if proc.reader.eof:
            self.dirty = True
            self._close_pipes(proc)

    def _close_pipes(self, proc: Proc) -> None:
        if proc.status_fd in self.by_fd:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(proc.status_fd)
            del self.by_fd[proc.status_fd]
            with contextlib.suppress(OSError):
                os.close(proc.status_fd)
        if proc.command_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(proc.command_fd)
            proc.command_fd = -1

    def command(self, proc: Proc, **cmd: Any) -> None:
        if proc.command_fd >= 0:
            with contextlib.suppress(OSError):
                protocol.write_event(proc.command_fd, {"cmd": cmd.pop("cmd"), **cmd})

    # ----------------------------------------------------------------------------- reaping

    def reap(self) -> bool:
        """Collect every exited child at once; True if there was any."""
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return reaped
            if pid == 0:
                return reaped
            reaped = True
            entry = self.by_pid.pop(pid, None)
            if entry is None:
                self.log.info("unknown_child_reaped", pid=pid, status=_describe_status(status))
                continue
            slot, proc = entry
            if proc.status_fd in self.by_fd:
                self._read_worker(proc)  # take its last words (boot_error) before closing
            self._close_pipes(proc)
            self.on_exit(slot, proc, status)

    def on_exit(self, slot: Slot, proc: Proc, status: int) -> None:
        now = time.monotonic()
        code = os.waitstatus_to_exitcode(status)
        lived = now - proc.started_at
        expected = proc.stop_mode is not None and not proc.stuck_reported
        what = _describe_status(status)
        self._bank_counters(slot, proc)
        charged = False
        if proc.board is not None:
            if not expected:
                charged = self._count_attempts(proc)
            proc.board.close()
            proc.board = None
        fields = dict(
            pool=proc.spec.route.name,
            slot=proc.spec.index,
            pid=proc.pid,
            exit=what,
            lived_s=round(lived, 3),
        )
        if proc is slot.incoming:
            slot.incoming = None
            if expected:
                self.log.info("worker_exited", **fields, reason=proc.stop_reason)
                return
            error = proc.boot_error or what
            self.log.error("replacement_failed", **fields, reason=error)
            self._abandon_replace(slot, f"replacement failed: {error}")
            if slot.proc is not None:
                return
            # the old worker had already let go of the session: fall through to a restart
            self._schedule_restart(slot, now, proc, code, f"replacement failed: {error}", charged)
            return
        if proc is not slot.proc:
            return
        slot.proc = None
        if expected:
            self.log.info("worker_exited", **fields, reason=proc.stop_reason)
            if slot.incoming is not None:
                self._promote_when_ready(slot)
            elif slot.retiring:
                self._forget_slot(slot)
            return
        reason = proc.stop_reason if proc.stuck_reported else (proc.boot_error or what)
        self.log.error("worker_died", **fields, reason=reason)
        if slot.retiring:
            self._forget_slot(slot)
            return
        if slot.incoming is not None:
            self._promote_when_ready(slot)
            return
        self._schedule_restart(slot, now, proc, code, reason, charged)

    def _schedule_restart(
        self, slot: Slot, now: float, proc: Proc, code: int, reason: str, charged: bool
    ) -> None:
        if self.shutting_down:
            return
        healthy = proc.ready_at is not None and now - proc.ready_at >= (
            self.manifest.supervisor.healthy_after
        )
        boot = code > 0 and _is_boot_failure(code)
        sup = self.manifest.supervisor
        message_fault = charged and proc.spec.route.max_attempts <= sup.failure_limit
        decision = after_exit(slot, now, healthy, boot, sup, self.rng, message_fault)
        slot.last_reason = reason
        slot.restarts += 1
        key = "stuck" if proc.stuck_reported else ("boot_failure" if boot else "crash")
        slot.restart_reasons[key] = slot.restart_reasons.get(key, 0) + 1
        slot.state = decision.state
        slot.next_start_at = now + decision.delay
        if decision.state == State.FAILED:
            self.log.error(
                "slot_failed",
                pool=slot.spec.route.name,
                slot=slot.spec.index,
                reason=reason,
                why=decision.reason,
                retry_in_s=round(decision.delay, 1),
            )
        elif decision.delay > 0:
            self.log.warning(
                "slot_backoff",
                pool=slot.spec.route.name,
                slot=slot.spec.index,
                delay_s=round(decision.delay, 3),
                failures=slot.consecutive_failures,
            )

    def _count_attempts(self, proc: Proc) -> bool:
        """The worker died with these messages in hand: one more failed attempt for each."""
        assert proc.board is not None
        inflight = proc.board.inflight()
        if not inflight:
            return False
        ledger = self.attempts.setdefault(proc.spec.route.name, AttemptLedger())
        for digest, count in ledger.record_crash(inflight).items():
            self.log.warning(
                "message_attempt_failed",
                pool=proc.spec.route.name,
                slot=proc.spec.index,
                pid=proc.pid,
                message=digest.hex()[:12],
                attempts=count,
                max_attempts=proc.spec.route.max_attempts,
            )
        return True

    def _bank_counters(self, slot: Slot, proc: Proc) -> None:
        """Keep totals monotonic across worker incarnations (Prometheus counters never go back)."""
        for name in ("received", "handled", "failed", "dead_lettered", "dropped", "duration_sum"):
            slot.counters_base[name] = slot.counters_base.get(name, 0) + float(
                proc.stats.get(name, 0) or 0
            )
        buckets = proc.stats.get("buckets") or []
        base = slot.counters_base.setdefault("buckets", [0] * len(buckets))  # type: ignore[arg-type]
        for i, c in enumerate(buckets):
            if i < len(base):
                base[i] += c  # type: ignore[index]
        proc.stats = {}

    def _forget_slot(self, slot: Slot) -> None:
        for key in [k for k, s in self.slots.items() if s is slot]:
            del self.slots[key]
        self.log.info("slot_retired", pool=slot.spec.route.name, slot=slot.spec.index)

    def _promote_when_ready(self, slot: Slot) -> None:
        """The old worker let go of the slot: the warmed replacement takes over."""
        incoming = slot.incoming
        assert incoming is not None
        slot.incoming = None
        slot.proc = incoming
        slot.spec = incoming.spec
        slot.state = State.STARTING
        if incoming.held and not incoming.connect_sent:
            incoming.connect_sent = True
            self.command(incoming, cmd="connect")

    def _abandon_replace(self, slot: Slot, reason: str) -> None:
        """A new handler that cannot start must not take the old, working one down with it."""
        pool = slot.spec.route.name
        for other in self.slots.values():
            if other.spec.route.name == pool and other.replace_reason:
                other.replace_reason = ""
                other.next_spec = None
        slot.last_reason = reason
        self.last_reload = {
            **self.last_reload,
            "ok": False,
            "error": f"route {pool}: {reason}; the running workers were kept",
        }

    # ------------------------------------------------------------------------------ health

    def check_health(self, now: float) -> None:
        min_life = self.manifest.supervisor.recycle_min_lifetime
        recycling_pools = {
            s.spec.route.name for s in self.slots.values() if s.incoming or s.replace_reason
        }
        for slot in list(self.slots.values()):
            for proc in slot.live:
                if proc.stop_mode is not None:
                    continue
                if not sample(proc):
                    continue  # gone or zombie: the reaper handles it
                if proc.held and proc is slot.incoming:
                    continue  # warming and idle by design
                verdict = assess(proc, now, min_life)
                if verdict.action == Action.KILL:
                    proc.stuck_reported = True
                    self.log.error(
                        "worker_unhealthy",
                        pool=proc.spec.route.name,
                        slot=proc.spec.index,
                        pid=proc.pid,
                        reason=verdict.reason,
                        action="kill",
                        busy_topic=proc.stats.get("busy_topic") or None,
                    )
                    # stuck or frozen, it cannot drain: SIGKILL now, its message is redelivered
                    proc.stop_mode, proc.stop_reason, proc.killed = (
                        protocol.STOP_KEEP,
                        verdict.reason,
                        True,
                    )
                    self._signal(proc, signal.SIGKILL)
                elif verdict.action == Action.RECYCLE and proc is slot.proc:
                    pool = slot.spec.route.name
                    if pool in recycling_pools:
                        continue  # one slot of a pool at a time
                    recycling_pools.add(pool)
                    self.log.warning(
                        "worker_recycle",
                        pool=pool,
                        slot=slot.spec.index,
                        pid=proc.pid,
                        reason=verdict.reason,
                    )
                    slot.replace_reason = verdict.reason
                    slot.next_spec = slot.spec

    # ------------------------------------------------------------------------- stopping

    def stop(self, proc: Proc, mode: str, reason: str, grace: float) -> None:
        if proc.stop_mode is not None and mode == proc.stop_mode:
            return
        proc.stop_mode = mode
        proc.stop_reason = reason
        deadline = time.monotonic() + grace
        proc.stop_deadline = (
            deadline if proc.stop_deadline is None else min(deadline, proc.stop_deadline)
        )
        if proc.command_fd >= 0:
            self.command(proc, cmd="stop", mode=mode)
        else:
            self._signal(proc, signal.SIGUSR2 if mode == protocol.STOP_RETIRE else signal.SIGTERM)

    def _enforce_stop_deadlines(self, now: float) -> None:
        for _, proc in list(self.by_pid.values()):
            if proc.stop_deadline is not None and now >= proc.stop_deadline and not proc.killed:
                proc.killed = True
                self.log.warning(
                    "worker_killed",
                    pool=proc.spec.route.name,
                    slot=proc.spec.index,
                    pid=proc.pid,
                    reason=f"did not stop in time ({proc.stop_reason})",
                )
                self._signal(proc, signal.SIGKILL)

    def _signal(self, proc: Proc, sig: int) -> None:
        if not same_process(proc):
            return  # already gone, or the PID now belongs to someone else
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)

    # --------------------------------------------------------------------------- reconcile

    def reconcile(self, now: float) -> None:
        """Bring every slot towards what it should be. The one place that (re)starts workers."""
        if self.shutting_down:
            return
        # One slot of a pool at a time: a replaced slot stays busy until its new worker is ready.
        busy_pools = {
            s.spec.route.name
            for s in self.slots.values()
            if s.incoming is not None
            or (s.proc is not None and s.proc.connect_sent and s.proc.ready_at is None)
        }
        for slot in list(self.slots.values()):
            pool = slot.spec.route.name
            if slot.retiring:
                self._reconcile_retiring(slot)
                continue
            if slot.proc is None and slot.incoming is None:
                if now < slot.next_start_at:
                    continue
                if slot.next_spec is not None:
                    slot.spec, slot.next_spec, slot.replace_reason = slot.next_spec, None, ""
                if self._client_id_held(slot, slot.spec.client_id):
                    continue  # a retiring worker still holds this session; its exit wakes us
                slot.proc = self.spawn(slot, slot.spec, hold=False)
                if slot.proc is None:
                    slot.state, slot.next_start_at = State.BACKOFF, now + 1.0
                else:
                    slot.state = State.STARTING
                continue
            if slot.incoming is not None:
                self._advance_replace(slot)
                continue
            if slot.replace_reason and pool not in busy_pools:
                if slot.proc is not None and slot.proc.ready_at is None:
                    continue  # replace from a settled state only
                if self._client_id_held(slot, (slot.next_spec or slot.spec).client_id):
                    continue
                busy_pools.add(pool)
                self._begin_replace(slot)

    def _begin_replace(self, slot: Slot) -> None:
        new = slot.next_spec or slot.spec
        reason = slot.replace_reason
        slot.replace_reason = ""
        slot.next_spec = None
        old = slot.proc
        assert old is not None
        same_session = new.client_id == old.spec.client_id
        self.log.info(
            "worker_replace",
            pool=new.route.name,
            slot=new.index,
            pid=old.pid,
            reason=reason,
            session="kept" if same_session else "new",
        )
        slot.restarts += 1
        slot.last_reason = reason
        key = _replace_kind(reason)
        slot.restart_reasons[key] = slot.restart_reasons.get(key, 0) + 1
        slot.incoming = self.spawn(slot, new, hold=same_session)

    def _advance_replace(self, slot: Slot) -> None:
        incoming, old = slot.incoming, slot.proc
        assert incoming is not None
        if old is None:
            self._promote_when_ready(slot)
            return
        if old.stop_mode is not None:
            return  # waiting for the old worker to let go
        grace = self.manifest.supervisor.graceful_timeout
        if incoming.held and incoming.warm:
            # Same session: the old worker finishes, acks, disconnects keeping the session;
            # then the warmed replacement connects (never two live clients on one client id).
            self.stop(old, protocol.STOP_KEEP, "replaced", grace)
        elif not incoming.held and incoming.ready_at is not None:
            # New session: the new worker is subscribed, so the old one can leave the group.
            self.stop(old, protocol.STOP_RETIRE, "replaced by a new subscription", grace)

    def _reconcile_retiring(self, slot: Slot) -> None:
        grace = self.manifest.supervisor.graceful_timeout
        for proc in slot.live:
            if proc.stop_mode is None:
                self.stop(proc, protocol.STOP_RETIRE, "retired", grace)
        if not slot.live:
            self._forget_slot(slot)

    def _client_id_held(self, slot: Slot, client_id: str) -> bool:
        """Another slot's live worker uses this client id: a slot that was retired and has come
        back under the same key. Two live clients on one id kick each other off, and the retiring
        one ends the session the new one would take, so the new worker waits for it to exit."""
        return any(
            other is not slot and proc.spec.client_id == client_id
            for other, proc in self.by_pid.values()
        )

    def _replacing(self) -> bool:
        return any(s.incoming is not None or s.replace_reason for s in self.slots.values())

    # ------------------------------------------------------------------------------ reload

    def reload(self) -> None:
        """SIGHUP: validate the new manifest first; on any error change nothing at all."""
        started = time.monotonic()
        self.notifier.reloading()
        try:
            new = load(self.manifest.path)
        except ManifestError as e:
            self.last_reload = {"ok": False, "at": time.time(), "error": str(e), "summary": None}
            self.log.error("reload_failed", reason=str(e), action="kept every running pool")
            self.notifier.ready(self.status_summary())
            return
        changes = self.apply(new)
        summary = summarize(changes)
        self.last_reload = {"ok": True, "at": time.time(), "error": None, "summary": summary}
        self.log.info(
            "reload_applied", **summary, duration_ms=round((time.monotonic() - started) * 1000, 1)
        )
        for warning in new.warnings:
            self.log.warning("manifest_warning", reason=warning)
        # READY=1 ends the reload for systemd: _notify sends it once the new workers are up.
        self.reload_ready_due = time.monotonic() + STARTUP_READY_TIMEOUT

    def apply(self, new: Manifest) -> list[Any]:
        current = {key: (s.next_spec or s.spec) for key, s in self.slots.items() if not s.retiring}
        changes = diff(current, slots_for(new))
        old_sup = self.manifest.supervisor
        self.manifest = new
        logsetup.set_secrets(new.secrets())
        if new.supervisor != old_sup:
            self.log.info("supervisor_settings_changed")
        for change in changes:
            slot = self.slots.get(change.key)
            if change.action == "start":
                if slot is not None and slot.retiring:
                    # the same key is coming back: let the old one retire under another key
                    self.slots[(f"{change.key[0]}~retiring~{id(slot)}", change.key[1])] = slot
                self.slots[change.key] = Slot(spec=change.new)  # type: ignore[arg-type]
            elif change.action == "retire" and slot is not None:
                slot.retiring = True
                slot.replace_reason = ""
                slot.next_spec = None
            elif change.action.startswith("replace") and slot is not None:
                assert change.new is not None
                if slot.proc is None and slot.incoming is None:
                    slot.spec = change.new
                    slot.next_spec = None
                    # a slot parked in backoff/failed gets the new spec now, not after the
                    # cool-down meant for the spec that kept failing
                    slot.next_start_at = 0.0
                else:
                    slot.next_spec = change.new
                    slot.replace_reason = "manifest changed"
            elif change.action == "keep" and slot is not None and change.new is not None:
                slot.spec = change.new  # equal for the worker; carries the new pool size
        return changes

    def drain_all(self) -> None:
        """Retire-host mode: start every slot's worker once, straight into retire."""
        self.draining = True
        for slot in self.slots.values():
            slot.proc = self.spawn(slot, slot.spec, hold=False)
            slot.retiring = True

    def restart_routes(self, routes: list[str] | None) -> list[str]:
        """Rolling restart keeping sessions: deploy new handler code without a manifest edit."""
        names = set(routes or [r.name for r in self.manifest.routes])
        unknown = names - {r.name for r in self.manifest.routes}
        if unknown:
            raise KeyError(", ".join(sorted(unknown)))
        for slot in self.slots.values():
            if slot.spec.route.name in names and not slot.retiring:
                if slot.proc is None and slot.incoming is None:
                    # parked in backoff or failed: the operator says the code is fixed, try now
                    slot.next_start_at = 0.0
                    continue
                slot.replace_reason = "restart requested"
                slot.next_spec = slot.next_spec or slot.spec
        self.log.info("restart_requested", routes=sorted(names))
        return sorted(names)

    # ------------------------------------------------------------------------------ status

    def slot_state(self, slot: Slot) -> str:
        proc = slot.proc
        if slot.retiring:
            return State.RETIRING.value
        if proc is None:
            return slot.state.value if slot.state in (State.BACKOFF, State.FAILED) else "starting"
        if proc.stop_mode is not None:
            return State.STOPPING.value
        return State.READY.value if proc.ready_at is not None else State.STARTING.value

    def counts(self) -> tuple[int, int, int]:
        """(ready, startable, failed) over the slots that should run."""
        ready = startable = failed = 0
        for slot in self.slots.values():
            if slot.retiring:
                continue
            state = self.slot_state(slot)
            if state == State.FAILED.value:
                failed += 1
                continue
            startable += 1
            if state == State.READY.value or (slot.incoming is not None and slot.proc is not None):
                ready += 1
        return ready, startable, failed

    def status_summary(self) -> str:
        return self._summary_line(*self.counts())

    def _summary_line(self, ready: int, startable: int, failed: int) -> str:
        line = f"{ready}/{startable} workers ready, {failed} failed"
        if not self.last_reload["ok"]:
            line += ", last reload failed"
        return line

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        slots = []
        for slot in self.slots.values():
            proc = slot.proc
            stats = proc.stats if proc is not None else {}
            base = slot.counters_base
            slots.append(
                {
                    "route": slot.spec.route.name,
                    "index": slot.spec.index,
                    "state": self.slot_state(slot),
                    "pid": proc.pid if proc else None,
                    "client_id": slot.spec.client_id,
                    "connected": bool(stats.get("connected")) if proc else False,
                    "uptime": round(now - proc.started_at, 1) if proc else None,
                    "restarts": slot.restarts,
                    "last_reason": slot.last_reason,
                    "rss": proc.rss if proc else None,
                    "cpu": round(proc.cpu, 1) if proc else None,
                    "handled": int(base.get("handled", 0) + (stats.get("handled") or 0)),
                    "failed": int(base.get("failed", 0) + (stats.get("failed") or 0)),
                    "last_error": stats.get("last_error") or "",
                    "replacing": slot.incoming is not None,
                }
            )
        ready, startable, failed = self.counts()
        return {
            "daemon": {
                "pid": self.pid,
                "uptime": round(now - self.started, 1),
                "manifest": self.manifest.path,
                "host_id": self.manifest.host_id,
                "shutting_down": self.shutting_down,
                "ready": ready,
                "startable": startable,
                "failed": failed,
                "last_reload": self.last_reload,
            },
            "slots": slots,
        }

    # ------------------------------------------------------------------------------ notify

    def _notify(self, now: float) -> None:
        if self.shutting_down:
            return
        ready, startable, failed = self.counts()
        summary = self._summary_line(ready, startable, failed)
        if not self.ready_notified and (
            ready >= startable or now - self.started > STARTUP_READY_TIMEOUT
        ):
            self.ready_notified = True
            self.status_line = summary
            self.notifier.ready(self.status_line)
            self.log.info(
                "master_ready",
                summary=self.status_line,
                startup_ms=round((now - self.started) * 1000, 1),
            )
        if self.reload_ready_due is not None and (
            (ready >= startable and not self._replacing()) or now >= self.reload_ready_due
        ):
            self.reload_ready_due = None
            self.status_line = summary
            self.notifier.ready(self.status_line)
        if summary != self.status_line:
            self.status_line = summary
            self.notifier.status(summary)
        if self.watchdog_every and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_every


def _replace_kind(reason: str) -> str:
    """The ``reason`` label of routemqd_worker_restarts_total for a planned replacement."""
    if reason.startswith("rss"):
        return "memory"
    if reason.startswith("cpu"):
        return "cpu"
    if reason == "manifest changed" or reason.startswith("replaced by"):
        return "reload"
    return "restart" if reason.startswith("restart") else "replace"


def _wake_only(signum: int, frame: object) -> None:
    """Signal handlers do nothing: Python's wakeup fd has already recorded the signal."""


def _set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - a declared dependency
        pass


def _is_boot_failure(code: int) -> bool:
    try:
        return ExitCode(code).is_boot_failure
    except ValueError:
        return False


def _describe_status(status: int) -> str:
    return _describe_status_code(os.waitstatus_to_exitcode(status))


def _describe_status_code(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return describe(code)


def _load_for_daemon(manifest_path: str) -> Manifest | None:
    """Load the manifest (one message on stderr if it is invalid) and set up logging from it."""
    try:
        manifest = load(manifest_path)
    except ManifestError as e:
        sys.stderr.write(f"routemqd: {e}\n")
        return None
    logsetup.configure(manifest.logging.level, manifest.logging.format, manifest.logging.file)
    logsetup.set_secrets(manifest.secrets())
    return manifest


def retire_host(manifest_path: str, host_id: str) -> int:
    """End the sessions of a host that is gone for good: for each of its slots, a worker resumes
    the session (handling what the broker queued for it), unsubscribes, drains, and ends it."""
    manifest = _load_for_daemon(manifest_path)
    if manifest is None:
        return int(ExitCode.CONFIG)
    manifest = dataclasses.replace(manifest, host_id=host_id)
    master = Master(manifest, socket_path=os.devnull)
    master.install_signals()
    for spec in slots_for(manifest).values():
        master.slots[spec.key] = Slot(spec=spec)
    master.log.info("retire_host_started", host_id=host_id, slots=len(master.slots))
    import paho.mqtt.client  # noqa: F401 - warm the forks, as run_master does

    master.drain_all()
    code = master.run()
    if master.shutting_down:
        master.log.warning("retire_host_interrupted", host_id=host_id)
        return 1
    master.log.info("retire_host_done", host_id=host_id)
    return code


def run_master(
    manifest_path: str, pidfile: str | None = None, socket_path: str | None = None
) -> int:
    manifest = _load_for_daemon(manifest_path)
    if manifest is None:
        return int(ExitCode.CONFIG)
    master = Master(manifest, socket_path=socket_path)
    master.install_signals()
    _set_title(f"routemqd: master {manifest.path}")
    pid = None
    if pidfile:
        try:
            pid = PidFile(pidfile)
            pid.acquire()
        except PidFileError as e:
            sys.stderr.write(f"routemqd: {e}\n")
            return 73  # EX_CANTCREAT
    try:
        # Workers import handler code themselves; pre-importing the MQTT client here makes every
        # fork start faster without the master ever talking MQTT.
        import paho.mqtt.client  # noqa: F401

        import routemqd.worker  # noqa: F401

        try:
            master.start_services()
        except AlreadyRunning as e:
            sys.stderr.write(f"routemqd: {e}; refusing to start a second daemon\n")
            return 73
        return master.run()
    finally:
        master.stop_services()
        if pid is not None:
            pid.release()
