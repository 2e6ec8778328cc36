"""The master: one loop that wakes on signals, pipes and timers, and hands the work out.

Shaped like gunicorn's arbiter. Signal handlers only wake the loop (:mod:`routemqd.signals`); the
loop reads what woke it, dispatches ``handle_<signal>``, feeds worker events to the slot table,
reaps children, runs the health checks (which kill stuck workers), and lets the slot table
reconcile every slot with what it should be. There is no other thread, so ``fork()`` is always
safe. Where things live:

- :mod:`routemqd.procs`: fork, pipes, signals to workers, reaping (process mechanics);
- :mod:`routemqd.slottable`: the slots, restarts, reload apply, reconcile (the only starter);
- :mod:`routemqd.slots`, :mod:`routemqd.handoff`, :mod:`routemqd.restarts`: the state table, the
  rolling replace, the restart policy;
- :mod:`routemqd.scaling`: the autoscaling pass once per health tick (policy in
  :mod:`routemqd.scaler`), resizing pools through the slot table;
- :mod:`routemqd.views`: status, counts and counter totals.

The master never imports handler code, worker code or paho, and never talks MQTT (DESIGN
invariant 1): the child imports the worker after ``fork()``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import selectors
import signal
import time
from typing import Any

import structlog

from routemqd import log as logsetup
from routemqd import signals as sigs
from routemqd import views
from routemqd.board import InflightBoard
from routemqd.exitcodes import ExitCode
from routemqd.manifest import Manifest, ManifestError, load
from routemqd.notify import NOTIFY_ENV_VARS, Notifier, watchdog_interval
from routemqd.plan import SlotSpec, diff, slots_for, summarize
from routemqd.poolview import PoolView
from routemqd.procs import ProcessTable
from routemqd.protocol import Command, StopMode
from routemqd.readiness import Readiness, set_title
from routemqd.restart_needed import restart_needed
from routemqd.scaling import Autoscaler, HostSampler, sample_host
from routemqd.slots import Slot
from routemqd.slottable import SlotTable

MAX_LOOP_SLEEP = 1.0
PASS_EVERY = 0.5  # the slot passes run at least this often, and at once after any change
HURRY = 1.0  # a second stop request: what is left gets this long


class AlreadyRunning(Exception):
    """Another routemqd answers on our control socket."""


class Master:
    def __init__(
        self,
        manifest: Manifest,
        socket_path: str | None = None,
        clock: Any = time.monotonic,
        ops: Any = os,
        host: HostSampler = sample_host,
    ) -> None:
        self.manifest = manifest
        self.boot_manifest = manifest  # what the control socket, metrics and logging came from
        self.log = structlog.get_logger("routemqd.master")
        self.pid = os.getpid()
        self.clock = clock
        self.started = clock()
        self.sel = selectors.DefaultSelector()
        self.notifier = Notifier.from_env()
        self.procs = ProcessTable(self.sel, self._child_main, clock, ops)
        self.table = SlotTable(self.procs, lambda: self.manifest.supervisor, random.Random())
        self.autoscaler = Autoscaler(self.table, host)
        self.readiness = Readiness(
            self.notifier,
            watchdog_interval(),
            self.started,
            manifest.supervisor.ready_timeout,
        )
        self.next_health = 0.0
        self.shutting_down = False
        self.reload_requested = False
        self.draining = False  # retire-host mode: retire every slot once, then exit
        self.dirty = True  # something besides a heartbeat happened: run the slot passes
        self.socket_path = socket_path or manifest.control.socket
        self.control: Any = None
        self.metrics: Any = None
        self._sig_r, self._sig_w = os.pipe()
        for fd in (self._sig_r, self._sig_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self.procs.close_in_child += [self._sig_r, self._sig_w]

    # what the control socket and /metrics read
    @property
    def slots(self) -> dict[tuple[str, int], Slot]:
        return self.table.slots

    @property
    def last_reload(self) -> dict[str, Any]:
        return self.table.last_reload

    @last_reload.setter
    def last_reload(self, value: dict[str, Any]) -> None:
        self.table.last_reload = value

    def _replacing(self) -> bool:
        return self.table.replacing()

    def counts(self) -> tuple[int, int, int]:
        return self.table.counts()

    def status_summary(self) -> str:
        slots = self.table.slots.values()
        return views.summary_line(
            *self.counts(), bool(self.last_reload["ok"]), views.waiting_for(slots)
        )

    def snapshot(self) -> dict[str, Any]:
        return views.snapshot(self, self.clock())

    def pool_views(self) -> list[PoolView]:
        return self.autoscaler.views(self.manifest)

    # --------------------------------------------------------------------------- set-up

    def install_signals(self) -> None:
        """Before anything is forked: a signal that arrives during start-up waits in the pipe."""
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in sigs.MASTER_SIGNALS:
            signal.signal(sig, sigs.wake_only)
        for sig in sigs.IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        self.sel.register(self._sig_r, selectors.EVENT_READ, "signals")
        # `routemqd run` blocked these at start-up; what arrived meanwhile is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs.MASTER_SIGNALS)

    def start_services(self) -> None:
        from routemqd.control import ControlServer, socket_mode
        from routemqd.metrics import MetricsServer

        try:
            mode = socket_mode(self.manifest.control, self.socket_path)
            self.control = ControlServer(self.socket_path, mode, self)
            self.sel.register(self.control.fileno(), selectors.EVENT_READ, "control")
            self.procs.close_in_child.append(self.control.fileno())
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
                self.procs.close_in_child.append(self.metrics.fileno())
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

    # ----------------------------------------------------------------------------- loop

    def run(self) -> int:
        if not self.slots:
            for spec in slots_for(self.manifest).values():
                self.table.add(spec, self.clock())
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
        next_pass = wake_at = 0.0
        while True:
            now = self.clock()
            if self.dirty or now >= next_pass:
                self.dirty = False
                next_pass = now + PASS_EVERY
                if self.manage(now):
                    break
                wake_at = now + self._next_timeout(now)
            events = self.sel.select(max(0.0, min(wake_at, next_pass) - self.clock()))
            for key, _ in events:
                self._dispatch(key)
            self.reap()
            now = self.clock()
            if now >= wake_at:
                self.dirty = True  # a backoff, stop deadline or watchdog timer is due
            if now >= self.next_health:
                self.table.check_health(now)
                self.scale(now)
                self.next_health = now + self.manifest.supervisor.health_interval
                self.dirty = True
        self.notifier.stopping()
        self.log.info("master_stopped", pid=self.pid)
        return int(ExitCode.OK)

    def manage(self, now: float) -> bool:
        """One pass: reconcile, deadlines, a queued reload, systemd. True when the loop is done."""
        self.table.reconcile(now)
        if not self.procs and (self.shutting_down or (self.draining and not self.slots)):
            return True
        self.table.enforce_stop_deadlines(now)
        if self.reload_requested and not self.shutting_down and not self._replacing():
            self.reload_requested = False
            self.reload()
        self._notify(now)
        return False

    def scale(self, now: float) -> None:
        """The autoscaling pass, right after psutil refreshed every worker's CPU. Not while the
        daemon stops or retires its host: then every slot is on its way out."""
        if self.shutting_down or self.draining or self.table.stopping:
            return
        self.autoscaler.run(self.manifest, now)

    def _next_timeout(self, now: float) -> float:
        wake = [now + MAX_LOOP_SLEEP, self.next_health, *self.table.next_wake(now)]
        wake += self.readiness.next_wake()
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
                name = sigs.handler_name(signum)
                if name is not None:
                    getattr(self, f"handle_{name}")()
        elif key.data == "worker":
            proc = self.procs.by_fd.get(key.fd)
            if proc is not None:
                self._read_worker(proc)
        elif key.data == "control":
            self.control.accept(self.sel)
        elif key.data == "metrics":
            self.metrics.accept()
        elif callable(key.data):
            key.data()

    def _read_worker(self, proc: Any) -> None:
        now = self.clock()
        for event in self.procs.read(proc):
            if event.get("t") != "hb":
                self.dirty = True
            self.table.on_event(proc, event, now)
        if proc.reader.eof:
            self.dirty = True

    def reap(self) -> None:
        for proc, status, last_words in self.procs.reap():
            self.dirty = True
            now = self.clock()
            for event in last_words:  # a boot_error written just before it exited
                self.table.on_event(proc, event, now)
            self.table.on_exit(proc, status, now)

    # -------------------------------------------------------------------------- signals

    def handle_term(self) -> None:
        self.begin_shutdown("SIGTERM")

    def handle_int(self) -> None:
        self.begin_shutdown("SIGINT")

    def handle_quit(self) -> None:
        self.log.warning("quick_shutdown", reason="SIGQUIT")
        self.shutting_down = True
        self.notifier.stopping()
        self.table.kill_all()

    def handle_hup(self) -> None:
        self.reload_requested = True
        self.log.info("reload_requested", reason="SIGHUP")

    def handle_chld(self) -> None:
        pass  # the loop reaps after every wake-up

    def handle_usr1(self) -> None:
        logsetup.sink().reopen()
        # Workers hold their own copy of the old file (inherited at fork): ask them to reopen too.
        for proc in self.procs:
            self.procs.command(proc, Command.REOPEN_LOGS)
        self.log.info("log_reopened", workers=len(self.procs))

    def begin_shutdown(self, reason: str, mode: str | None = None) -> None:
        """Graceful stop. ``keep``: sessions stay and queue for this host's return (a restart);
        ``retire``: every slot leaves its group and ends its session (a host removed for good)."""
        now = self.clock()
        if self.shutting_down:
            self.table.hurry(now, HURRY)  # a second request: stop waiting for in-flight work
            self.log.warning("shutdown_hurried", reason=reason)
            return
        self.shutting_down = True
        self.notifier.stopping()
        stop_mode = StopMode(mode or self.manifest.supervisor.stop_mode)
        grace = self.manifest.supervisor.graceful_timeout
        self.log.info(
            "shutdown_started",
            reason=reason,
            mode=str(stop_mode),
            workers=len(self.procs),
            graceful_timeout=grace,
        )
        self.table.stop_all(stop_mode, grace, now)

    # --------------------------------------------------------------------------- reload

    def reload(self) -> None:
        """SIGHUP: validate the new manifest first; on any error change nothing at all."""
        if self.shutting_down:
            self.log.warning("reload_refused", reason="the daemon is stopping")
            return
        started = self.clock()
        self.notifier.reloading()
        try:
            new = load(self.manifest.path)
        except ManifestError as e:
            self.last_reload = {"ok": False, "at": time.time(), "error": str(e), "summary": None}
            self.log.error("reload_failed", reason=str(e), action="kept every running pool")
            self.notifier.ready(self.status_summary())
            return
        # An autoscaled pool keeps what it runs (held in the new range), not its initial size.
        changes = diff(self.table.current_specs(), slots_for(new, self.autoscaler.running()))
        old_supervisor = self.manifest.supervisor
        self.manifest = new
        self.readiness.ready_timeout = new.supervisor.ready_timeout
        logsetup.set_secrets(new.secrets())
        if new.supervisor != old_supervisor:
            self.log.info("supervisor_settings_changed")
        self.table.apply(changes, self.clock())
        summary = summarize(changes)
        self.last_reload = {"ok": True, "at": time.time(), "error": None, "summary": summary}
        duration_ms = round((self.clock() - started) * 1000, 1)
        self.log.info("reload_applied", **summary, duration_ms=duration_ms)
        # settings only a restart applies: reported, never silently ignored
        self.last_reload["restart_needed"] = pending = list(restart_needed(self.boot_manifest, new))
        if pending:
            self.log.warning("reload_needs_restart", settings=pending, action="restart to apply")
        for warning in new.warnings:
            self.log.warning("manifest_warning", reason=warning)
        self.readiness.reload_applied(self.clock())

    def restart_routes(self, routes: list[str] | None) -> list[str]:
        """``routemqd restart``: a rolling restart keeping sessions."""
        names = set(routes or [r.name for r in self.manifest.routes])
        unknown = names - {r.name for r in self.manifest.routes}
        if unknown:
            raise KeyError(", ".join(sorted(unknown)))
        self.table.restart(names)
        self.log.info("restart_requested", routes=sorted(names))
        return sorted(names)

    def _notify(self, now: float) -> None:
        if not self.shutting_down:
            ready, startable, failed = self.counts()
            ok = bool(self.last_reload["ok"])
            waiting = views.waiting_for(self.table.slots.values()) if ready < startable else ""
            self.readiness.update(now, ready, startable, failed, ok, self._replacing(), waiting)

    # ---------------------------------------------------------------------- child side

    def _child_main(
        self,
        spec: SlotSpec,
        hold: bool,
        status_w: int,
        command_r: int,
        board: InflightBoard,
        attempts: dict[bytes, int],
    ) -> int:  # pragma: no cover - runs in the child, after fork()
        from routemqd.worker import run, set_parent_death_signal

        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.pid:
            return int(ExitCode.PARENT_GONE)
        self.notifier.forget()
        for var in NOTIFY_ENV_VARS:
            os.environ.pop(var, None)
        set_title(f"routemqd: worker {spec.label}")
        return run(
            spec,
            status_w,
            command_r,
            hold=hold,
            parent_pid=self.pid,
            board=board,
            attempts=attempts,
        )
