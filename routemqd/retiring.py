"""Retiring a slot: leave the group, drain, end the session, then leave the table.

A slot removed for good (a reload, a scale-down by hand or by the scaler, a host leaving) must
not strand its session: a member whose process died but whose persistent session lives keeps
receiving its share of a shared subscription, queued for nobody (docs/BROKER-FACTS.md). So::

    (any) -> RETIRING     its workers are told to stop in retire mode: UNSUBSCRIBE, handle what
                          is in flight, DISCONNECT ending the session, then say ``session_ended``
          -> GONE         every worker has exited and every session it used is ended

A session that no worker ended (its worker was killed mid-retire, the broker was away, or the
slot had no worker when it was removed) gets a new worker on the same client id, straight into
retire: it resumes the session, handles what the broker queued, and ends it. After a backoff if
that repeats; not when a slot that stays uses the client id (it resumes the session itself);
given up with an error when the worker cannot even boot. The slot table calls these functions.
"""

from __future__ import annotations

import os
from typing import Any

from routemqd.procs import Proc, describe_status, is_boot_failure
from routemqd.protocol import StopMode
from routemqd.restarts import FORK_RETRY, backoff_delay
from routemqd.slots import Slot


def begin(slot: Slot) -> None:
    """Just moved to RETIRING. Without a worker (parked, or not started yet) its session may
    hold the share the broker queued for it meanwhile: only a worker can resume and end it."""
    if not slot.live:
        slot.drain[slot.spec.client_id] = slot.spec
        slot.next_start_at = 0.0


def reconcile(table: Any, slot: Slot, now: float) -> None:
    """Stop its workers in retire mode; once none is left, resume a session none of them ended,
    or let the slot leave the table."""
    grace = table.supervisor.graceful_timeout
    for proc in slot.live:
        if proc.stop_mode is None:
            table.stop(proc, StopMode.RETIRE, "retired", grace, now)
    if slot.live:
        return
    for client_id in [c for c in slot.drain if _kept_by_another(table, slot, c)]:
        del slot.drain[client_id]  # a slot that stays resumes this session itself
    if not slot.drain:
        table.forget(slot, now)
        return
    if now < slot.next_start_at:
        return
    spec = next(iter(slot.drain.values()))
    proc = table.spawn(slot, spec, hold=False)
    if proc is None:
        slot.next_start_at = now + FORK_RETRY
        return
    slot.proc = proc
    table.log.warning("retire_resumed", **proc.label, client_id=spec.client_id)
    table.stop(proc, StopMode.RETIRE, "retired", grace, now)


def note_exit(table: Any, slot: Slot, proc: Proc, status: int, now: float) -> None:
    """One of its workers exited: either it ended its session, or another worker has to."""
    client_id = proc.spec.client_id
    if proc.session_ended:
        slot.drain.pop(client_id, None)
        return
    if proc.held and not proc.connect_sent:
        return  # never connected: the session is its predecessor's to end
    code = os.waitstatus_to_exitcode(status)
    if code > 0 and is_boot_failure(code):
        slot.drain.pop(client_id, None)
        table.log.error(
            "retire_abandoned",
            **proc.label,
            client_id=client_id,
            reason=proc.boot_error or describe_status(status),
        )
        return
    slot.drain[client_id] = proc.spec
    slot.drains += 1
    # the restart policy's backoff, as if each drain were a second failure or later
    slot.next_start_at = now + backoff_delay(slot.drains + 1, table.supervisor, table.rng)


def _kept_by_another(table: Any, slot: Slot, client_id: str) -> bool:
    return any(
        other is not slot
        and not other.retiring
        and (other.next_spec or other.spec).client_id == client_id
        for other in table.slots.values()
    )
