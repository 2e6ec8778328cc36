"""The slot table: every slot of every pool, and everything that moves them.

The loop feeds it what happened (a worker's event, an exit, a health verdict, a reload's plan
changes, a restart request) and calls :meth:`SlotTable.reconcile`, the one place that starts
workers. Each move of a slot goes through ``Slot.change_state`` (see :mod:`routemqd.slots` for
the table of legal moves); the restart policy is :mod:`routemqd.restarts`, the rolling replace
:mod:`routemqd.handoff`, the way out of a removed slot :mod:`routemqd.retiring`. Processes are
reached only through ``procs`` (a :class:`routemqd.procs.ProcessTable`, or a fake in the unit
tests).

Pools change size through :meth:`add` and :meth:`retire` only, whoever asks: a reload, or the
autoscaler (:mod:`routemqd.scaling`). A slot removed for good always retires (unsubscribe,
drain, end the session).
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from typing import Any

import structlog

from routemqd import handoff, health, retiring, views
from routemqd.board import AttemptLedger
from routemqd.manifest import SupervisorConfig
from routemqd.plan import SlotSpec
from routemqd.procs import Proc, describe_status, is_boot_failure
from routemqd.protocol import Command, Event, StopMode
from routemqd.restarts import FORK_RETRY, RestartReason, after_exit, message_to_blame
from routemqd.slots import HANDOFF, PARKED, Slot, State


class SlotTable:
    def __init__(
        self,
        procs: Any,
        supervisor: Callable[[], SupervisorConfig],
        rng: random.Random | None = None,
    ) -> None:
        self.procs = procs
        self._supervisor = supervisor
        self.rng = rng or random.Random()
        self.log = structlog.get_logger("routemqd.master")
        self.slots: dict[tuple[str, int], Slot] = {}
        self.owner: dict[int, tuple[Slot, Proc]] = {}  # live worker PID -> its slot
        self.attempts: dict[str, AttemptLedger] = {}  # per pool: messages that killed workers
        self.last_reload: dict[str, Any] = {"ok": True, "at": None, "error": None, "summary": None}
        self.stopping = False

    @property
    def supervisor(self) -> SupervisorConfig:
        return self._supervisor()

    # ---------------------------------------------------------------------- membership

    def add(self, spec: SlotSpec, now: float) -> Slot:
        """A new slot, STARTING; the next reconcile forks its worker."""
        old = self.slots.get(spec.key)
        if old is not None and old.retiring:
            # the same key is coming back: the old one finishes retiring under another key
            self.slots[(f"{spec.key[0]}~retiring~{id(old)}", spec.key[1])] = old
        slot = Slot(spec=spec, since=now)
        self.slots[spec.key] = slot
        return slot

    def retire(self, slot: Slot, now: float) -> None:
        """(any) -> RETIRING: leave the group and end the session, then leave the table."""
        if slot.retiring:
            return
        slot.change_state(State.RETIRING, now)
        slot.replace_reason = ""
        slot.next_spec = None
        retiring.begin(slot)

    def forget(self, slot: Slot, now: float) -> None:
        # RETIRING -> GONE
        slot.change_state(State.GONE, now)
        for key in [k for k, s in self.slots.items() if s is slot]:
            del self.slots[key]

    # ----------------------------------------------------------------------- reconcile

    def reconcile(self, now: float) -> None:
        """Bring every slot towards what it should be. The one place that (re)starts workers."""
        if self.stopping:
            return
        # One slot of a pool at a time: a replaced slot stays busy until its new worker is ready.
        busy_pools = {s.pool for s in self.slots.values() if s.state in HANDOFF}
        for slot in list(self.slots.values()):
            if slot.state is State.RETIRING:
                retiring.reconcile(self, slot, now)
            elif not slot.live:
                if slot.state in PARKED and now < slot.next_start_at:
                    continue
                self._start(slot, now)
            elif slot.state in HANDOFF:
                handoff.advance(self, slot, now)
            elif slot.replace_reason and slot.state is State.READY and slot.pool not in busy_pools:
                if self._client_id_held(slot, (slot.next_spec or slot.spec).client_id):
                    continue
                busy_pools.add(slot.pool)
                handoff.begin(self, slot, now)

    def _start(self, slot: Slot, now: float) -> None:
        if slot.state is State.STOPPING:
            return
        if slot.next_spec is not None:
            slot.spec, slot.next_spec, slot.replace_reason = slot.next_spec, None, ""
        if self._client_id_held(slot, slot.spec.client_id):
            return  # a retiring worker still holds this session; its exit wakes us
        if slot.state in PARKED:
            # BACKOFF -> STARTING, FAILED -> STARTING
            slot.change_state(State.STARTING, now)
        slot.proc = self.spawn(slot, slot.spec, hold=False)
        if slot.proc is None:
            # STARTING -> BACKOFF
            slot.next_start_at = now + FORK_RETRY
            slot.change_state(
                State.BACKOFF, now, delay_s=FORK_RETRY, failures=slot.consecutive_failures
            )

    def spawn(self, slot: Slot, spec: SlotSpec, hold: bool) -> Proc | None:
        attempts = self.attempts.setdefault(spec.route.name, AttemptLedger()).snapshot()
        proc = self.procs.spawn(spec, hold, attempts)
        if proc is not None:
            self.owner[proc.pid] = (slot, proc)
        return proc

    def _client_id_held(self, slot: Slot, client_id: str) -> bool:
        """Another slot's live worker uses this client id: a slot that was retired and has come
        back under the same key. Two live clients on one id kick each other off, and the retiring
        one ends the session the new one would take, so the new worker waits for it to exit."""
        return any(
            other is not slot and proc.spec.client_id == client_id
            for other, proc in self.owner.values()
        )

    def replacing(self) -> bool:
        return any(s.incoming is not None or s.replace_reason for s in self.slots.values())

    def next_wake(self, now: float) -> list[float]:
        wake = [
            s.next_start_at
            for s in self.slots.values()
            if (s.state in PARKED or s.drain) and not s.live
        ]
        wake += [p.stop_deadline for _, p in self.owner.values() if p.stop_deadline is not None]
        return wake

    # -------------------------------------------------------------------- worker events

    def on_event(self, proc: Proc, event: dict[str, Any], now: float) -> None:
        kind = event.get("t")
        if kind == Event.HEARTBEAT:
            proc.last_heartbeat = now
            proc.stats, proc.stats_at = event, now
            if event.get("resolved"):
                ledger = self.attempts.get(proc.spec.route.name)
                if ledger is not None:
                    ledger.resolve([bytes.fromhex(d) for d in event["resolved"]])
        elif kind == Event.READY:
            proc.last_heartbeat = now
            if proc.ready_at is None:
                proc.ready_at = now
                startup_ms = round((now - proc.started_at) * 1000, 1)
                self.log.info("worker_ready", **proc.label, startup_ms=startup_ms)
                self._ready(proc, now)
        elif kind == Event.WARM:
            proc.warm = True
            proc.last_heartbeat = now
        elif kind == Event.BOOT_ERROR:
            proc.boot_error = str(event.get("reason", ""))
        elif kind == Event.SESSION_ENDED:
            proc.session_ended = True
        elif kind == Event.STUCK:
            self.log.error(
                "worker_stuck",
                **proc.label,
                topic=event.get("topic"),
                busy_for=event.get("busy_for"),
                stack=event.get("stack"),
            )

    def _ready(self, proc: Proc, now: float) -> None:
        slot, _ = self.owner.get(proc.pid, (None, None))
        # STARTING -> READY, CONNECTING -> READY
        if (
            slot is not None
            and proc is slot.proc
            and slot.state in (State.STARTING, State.CONNECTING)
        ):
            slot.change_state(State.READY, now)

    # -------------------------------------------------------------------------- exits

    def on_exit(self, proc: Proc, status: int, now: float) -> None:
        slot, _ = self.owner.pop(proc.pid, (None, None))
        if slot is None:
            return
        expected = proc.stop_mode is not None and not proc.stuck_reported
        what = describe_status(status)
        views.bank(slot, proc)
        charged = False
        if proc.board is not None:
            # asked to stop, yet it died with messages in its hands (a crash, a kill from
            # outside, or ours at the deadline): they count too, or a retire's drain could meet
            # the same poison or endless handler forever
            if not expected or status != 0:
                charged = self._count_attempts(proc)
            proc.board.close()
            proc.board = None
        fields = dict(**proc.label, exit=what, lived_s=round(now - proc.started_at, 3))
        if slot.retiring:
            retiring.note_exit(self, slot, proc, status, now)
        if proc is slot.incoming:
            slot.incoming = None
            if expected:
                self.log.info("worker_exited", **fields, reason=proc.stop_reason)
                return
            error = proc.boot_error or what
            self.log.error("replacement_failed", **fields, reason=error)
            handoff.abandon(self, slot, f"replacement failed: {error}", now)
            return
        if proc is not slot.proc:
            return
        slot.proc = None
        if expected:
            self.log.info("worker_exited", **fields, reason=proc.stop_reason)
        else:
            reason = proc.stop_reason if proc.stuck_reported else (proc.boot_error or what)
            self.log.error("worker_died", **fields, reason=reason)
        if self.stopping:
            return
        if slot.state is State.RETIRING:
            if not slot.live and not slot.drain:
                self.forget(slot, now)
        elif slot.incoming is not None:
            handoff.promote(self, slot, now)
        elif expected:
            # DRAINING -> STARTING: its replacement failed while it drained; start afresh
            slot.change_state(State.STARTING, now)
        else:
            self._after_death(slot, proc, os.waitstatus_to_exitcode(status), reason, charged, now)

    def _after_death(
        self, slot: Slot, proc: Proc, code: int, reason: str, charged: bool, now: float
    ) -> None:
        """(died) -> STARTING, BACKOFF or FAILED, as the restart policy decides."""
        sup = self.supervisor
        healthy = proc.ready_at is not None and now - proc.ready_at >= sup.healthy_after
        boot = code > 0 and is_boot_failure(code)
        fault = message_to_blame(charged, proc.spec.route, sup)
        decision = after_exit(slot, now, healthy, boot, sup, self.rng, fault)
        slot.last_reason = reason
        slot.restarts += 1
        if proc.stuck_reported:
            key = RestartReason.STUCK
        else:
            key = RestartReason.BOOT_FAILURE if boot else RestartReason.CRASH
        slot.restart_reasons[key] = slot.restart_reasons.get(key, 0) + 1
        slot.next_start_at = now + decision.delay
        if decision.state is State.FAILED:
            slot.change_state(
                State.FAILED,
                now,
                reason=reason,
                why=decision.reason,
                retry_in_s=round(decision.delay, 1),
            )
        elif decision.state is State.BACKOFF:
            slot.change_state(
                State.BACKOFF,
                now,
                delay_s=round(decision.delay, 3),
                failures=slot.consecutive_failures,
            )
        else:
            slot.change_state(State.STARTING, now)

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
                **proc.label,
                message=digest.hex()[:12],
                attempts=count,
                max_attempts=proc.spec.route.max_attempts,
            )
        return True

    # ------------------------------------------------------------------------- health

    def check_health(self, now: float) -> None:
        health.check(self, now)

    def kill_stuck(self, slot: Slot, proc: Proc, reason: str, now: float) -> None:
        """Stuck or frozen, it cannot drain: SIGKILL at once; its message is redelivered and
        counted as one attempt against it."""
        proc.stuck_reported = True
        proc.stop_mode, proc.stop_reason = StopMode.KEEP, reason
        self.procs.kill(proc)
        if proc is not slot.proc or slot.state is State.RETIRING:
            return
        if slot.state in (State.WARMING, State.SUBSCRIBING):
            slot.change_state(State.DRAINING, now)  # the old worker leaves mid-handoff
        elif slot.state in (State.STARTING, State.READY, State.CONNECTING):
            slot.change_state(State.STOPPING, now)

    # ------------------------------------------------------------------------ stopping

    def stop(self, proc: Proc, mode: StopMode, reason: str, grace: float, now: float) -> None:
        if proc.stop_mode is not None and mode == proc.stop_mode:
            return
        proc.stop_mode = mode
        proc.stop_reason = reason
        deadline = now + grace
        proc.stop_deadline = (
            deadline if proc.stop_deadline is None else min(deadline, proc.stop_deadline)
        )
        if not self.procs.command(proc, Command.STOP, mode=mode):
            self.procs.signal(proc, signal.SIGUSR2 if mode == StopMode.RETIRE else signal.SIGTERM)

    def stop_all(self, mode: StopMode, grace: float, now: float) -> None:
        """Shutdown: every live worker stops (``mode``); nothing restarts any more."""
        self.stopping = True
        for slot in self.slots.values():
            for proc in slot.live:
                # a held replacement never connected: it has no session to retire
                held = proc is slot.incoming and proc.held and not proc.connect_sent
                self.stop(proc, StopMode.KEEP if held else mode, "shutdown", grace, now)
            if slot.live and slot.state not in (State.RETIRING, State.STOPPING):
                slot.change_state(State.STOPPING, now)

    def hurry(self, now: float, within: float) -> None:
        for _, proc in self.owner.values():
            if proc.stop_deadline is not None:
                proc.stop_deadline = min(proc.stop_deadline, now + within)

    def kill_all(self) -> None:
        self.stopping = True
        for _, proc in list(self.owner.values()):
            self.procs.kill(proc)

    def enforce_stop_deadlines(self, now: float) -> None:
        for _, proc in list(self.owner.values()):
            if proc.stop_deadline is not None and now >= proc.stop_deadline and not proc.killed:
                self.log.warning(
                    "worker_killed",
                    **proc.label,
                    reason=f"did not stop in time ({proc.stop_reason})",
                )
                self.procs.kill(proc)

    # ------------------------------------------------------------------ reload, restart

    def apply(self, changes: list[Any], now: float) -> None:
        """A validated reload's plan changes; unchanged slots keep their workers."""
        for change in changes:
            slot = self.slots.get(change.key)
            if change.action == "start":
                self.add(change.new, now)
            elif change.action == "retire" and slot is not None:
                self.retire(slot, now)
            elif change.action.startswith("replace") and slot is not None:
                if not slot.live:
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

    def current_specs(self) -> dict[tuple[str, int], SlotSpec]:
        """What each slot that stays runs, or will run once its pending replace is done."""
        return {k: (s.next_spec or s.spec) for k, s in self.slots.items() if not s.retiring}

    def restart(self, pools: set[str]) -> None:
        """Rolling restart keeping sessions: deploy new handler code without a manifest edit."""
        for slot in self.slots.values():
            if slot.pool in pools and not slot.retiring:
                if not slot.live:
                    # parked in backoff or failed: the operator says the code is fixed, try now
                    slot.next_start_at = 0.0
                    continue
                slot.replace_reason = "restart requested"
                slot.next_spec = slot.next_spec or slot.spec

    def drain_all(self, now: float) -> None:
        """Retire-host mode: start every slot's worker once, straight into retire."""
        for slot in self.slots.values():
            slot.proc = self.spawn(slot, slot.spec, hold=False)
            self.retire(slot, now)

    def counts(self) -> tuple[int, int, int]:
        return views.counts(self.slots.values())
