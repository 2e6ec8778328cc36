"""The rolling replace of one slot's worker, as one sequence of slot states.

Keeping the session (a new handler version, a recycle, the same subscription)::

    READY -> WARMING      fork the replacement *held*: it imports its handler, does not connect
          -> DRAINING     it is warm: the old worker finishes in-flight work, acks, disconnects
                          keeping the session (two live clients on one client id kick each other
                          off, so the new one must wait)
          -> CONNECTING   the old worker is gone: ``connect``, and the replacement resumes the
                          session with everything the broker queued meanwhile
          -> READY        the replacement is subscribed

A new subscription (a new session)::

    READY -> SUBSCRIBING  fork the new worker; it connects and subscribes under its own id
          -> DRAINING     it is subscribed: the old worker unsubscribes, drains, ends its session
          -> READY        the old worker is gone

If the replacement fails before DRAINING, the slot goes back to READY with the old worker, and
the pool's other pending replaces are cancelled (a new handler that cannot start must not take
the working one down with it). The slot table calls these functions; they only move the slot.
"""

from __future__ import annotations

from typing import Any

import structlog

from routemqd.protocol import Command, StopMode
from routemqd.restarts import RestartReason, replace_kind
from routemqd.slots import Slot, State

log = structlog.get_logger("routemqd.master")


def begin(table: Any, slot: Slot, now: float) -> None:
    """READY -> WARMING or SUBSCRIBING."""
    new = slot.next_spec or slot.spec
    old = slot.proc
    assert old is not None
    same_session = new.client_id == old.spec.client_id
    reason = slot.replace_reason
    log.info(
        "worker_replace",
        pool=new.route.name,
        slot=new.index,
        pid=old.pid,
        reason=reason,
        session="kept" if same_session else "new",
    )
    incoming = table.spawn(slot, new, hold=same_session)
    if incoming is None:
        return  # fork failed: the request stays and is tried again on the next pass
    slot.replace_reason = ""
    slot.next_spec = None
    slot.restarts += 1
    slot.last_reason = reason
    kind: RestartReason = replace_kind(reason)
    slot.restart_reasons[kind] = slot.restart_reasons.get(kind, 0) + 1
    slot.incoming = incoming
    slot.change_state(State.WARMING if same_session else State.SUBSCRIBING, now)


def advance(table: Any, slot: Slot, now: float) -> None:
    """WARMING or SUBSCRIBING -> DRAINING once the replacement is warm or subscribed."""
    incoming, old = slot.incoming, slot.proc
    if incoming is None or old is None or slot.state is State.DRAINING:
        return  # DRAINING: waiting for the old worker's exit, which promotes the new one
    grace = table.supervisor.graceful_timeout
    # WARMING -> DRAINING
    if slot.state is State.WARMING and incoming.warm:
        table.stop(old, StopMode.KEEP, "replaced", grace, now)
        slot.change_state(State.DRAINING, now)
    # SUBSCRIBING -> DRAINING
    elif slot.state is State.SUBSCRIBING and incoming.ready_at is not None:
        table.stop(old, StopMode.RETIRE, "replaced by a new subscription", grace, now)
        slot.change_state(State.DRAINING, now)


def promote(table: Any, slot: Slot, now: float) -> None:
    """The old worker let go of the slot: DRAINING (or WARMING/SUBSCRIBING if it died early)
    -> CONNECTING, or straight to READY when the new worker is already subscribed."""
    incoming = slot.incoming
    assert incoming is not None
    slot.incoming = None
    slot.proc = incoming
    slot.spec = incoming.spec
    if incoming.held and not incoming.connect_sent:
        incoming.connect_sent = True
        table.procs.command(incoming, Command.CONNECT)
    slot.change_state(State.READY if incoming.ready_at is not None else State.CONNECTING, now)


def abandon(table: Any, slot: Slot, reason: str, now: float) -> None:
    """The replacement failed: WARMING or SUBSCRIBING -> READY with the old worker; in DRAINING
    the old worker is already leaving, and its exit restarts the slot."""
    pool = slot.spec.route.name
    for other in table.slots.values():
        if other.spec.route.name == pool and other.replace_reason:
            other.replace_reason = ""
            other.next_spec = None
    slot.last_reason = reason
    table.last_reload = {
        **table.last_reload,
        "ok": False,
        "error": f"route {pool}: {reason}; the running workers were kept",
    }
    if slot.state in (State.WARMING, State.SUBSCRIBING) and slot.proc is not None:
        slot.change_state(State.READY, now)
