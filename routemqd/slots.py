"""A slot's one stored state, and the one place that changes it.

A slot is a position in a pool, ``(route, index)``. Whatever happens to its workers (a fork, a
ready report, an exit, a reload, a health verdict), the slot table moves it with
:meth:`Slot.change_state`, which refuses a transition that is not in :data:`TRANSITIONS` and
writes the log event. ``routemqd status`` shows :attr:`Slot.shown`, a coarser name per state.

Transitions (the table below is the code's; DESIGN.md repeats it):

    STARTING    -> READY         the worker is subscribed (CONNACK and SUBACK)
    READY       -> WARMING       replace keeping the session: a held replacement imports its code
    READY       -> SUBSCRIBING   replace with a new subscription: the new worker subscribes first
    WARMING     -> DRAINING      it is warm: the old worker finishes, acks, disconnects (keeps)
    SUBSCRIBING -> DRAINING      it is subscribed: the old worker unsubscribes, drains, ends
    WARMING     -> READY         the replacement failed: the old worker goes on as before
    SUBSCRIBING -> READY         (same)
    WARMING     -> CONNECTING    the old worker died early: the replacement takes over now
    SUBSCRIBING -> CONNECTING    (same)
    DRAINING    -> CONNECTING    the old worker is gone: the replacement connects to the session
    DRAINING    -> READY         the old worker is gone, the new one is already subscribed
    CONNECTING  -> READY         the replacement is subscribed: the handoff is over
    STARTING, READY, CONNECTING, DRAINING, STOPPING
                -> STARTING      the worker died: restart at once (first crash, or a poison
                                 message's death, which counts against the message)
                -> BACKOFF       the worker died again: wait, exponentially, with jitter
                -> FAILED        boot failure, or too many deaths in the window: cool down
    STARTING, READY, CONNECTING -> STOPPING   shutdown, or a stuck worker killed
    WARMING, SUBSCRIBING, DRAINING -> STOPPING   shutdown during a handoff
    WARMING, SUBSCRIBING -> DRAINING          the old worker was killed (stuck) mid-handoff
    STARTING    -> BACKOFF       fork() failed
    BACKOFF     -> STARTING      the delay is over: fork
    FAILED      -> STARTING      the cool-down is over, or an operator asked for a restart
    (any but GONE) -> RETIRING   removed (reload, scale-down): unsubscribe, drain, end session
    RETIRING    -> GONE          a worker ended its session and all have exited (one that
                                 died mid-retire is followed by another on the same session)

A replace is one sequence: ``READY -> WARMING -> DRAINING -> CONNECTING -> READY`` keeping the
session (warm, drain, connect: never two live clients on one client id), or
``READY -> SUBSCRIBING -> DRAINING -> READY`` when the subscription changes (the new session is
subscribed before the old one leaves the group).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from routemqd.plan import SlotSpec

if TYPE_CHECKING:
    from routemqd.procs import Proc

log = structlog.get_logger("routemqd.master")


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    WARMING = "warming"
    SUBSCRIBING = "subscribing"
    DRAINING = "draining"
    CONNECTING = "connecting"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"
    RETIRING = "retiring"
    GONE = "gone"


S = State
_DIED = frozenset({S.STARTING, S.BACKOFF, S.FAILED})
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STARTING: _DIED | {S.READY, S.STOPPING, S.RETIRING},
    S.READY: _DIED | {S.WARMING, S.SUBSCRIBING, S.STOPPING, S.RETIRING},
    S.WARMING: frozenset({S.DRAINING, S.READY, S.CONNECTING, S.STOPPING, S.RETIRING}),
    S.SUBSCRIBING: frozenset({S.DRAINING, S.READY, S.CONNECTING, S.STOPPING, S.RETIRING}),
    S.DRAINING: _DIED | {S.CONNECTING, S.READY, S.STOPPING, S.RETIRING},
    S.CONNECTING: _DIED | {S.READY, S.STOPPING, S.RETIRING},
    S.STOPPING: _DIED | {S.RETIRING},
    S.BACKOFF: frozenset({S.STARTING, S.RETIRING}),
    S.FAILED: frozenset({S.STARTING, S.RETIRING}),
    S.RETIRING: frozenset({S.GONE}),
    S.GONE: frozenset(),
}

# What ``routemqd status`` shows: the handoff states read as the worker that serves meanwhile.
SHOWN: dict[State, str] = {
    S.STARTING: "starting",
    S.READY: "ready",
    S.WARMING: "ready",
    S.SUBSCRIBING: "ready",
    S.DRAINING: "stopping",
    S.CONNECTING: "starting",
    S.STOPPING: "stopping",
    S.BACKOFF: "backoff",
    S.FAILED: "failed",
    S.RETIRING: "retiring",
    S.GONE: "retiring",
}
HANDOFF = frozenset({S.WARMING, S.SUBSCRIBING, S.DRAINING, S.CONNECTING})
SERVING = frozenset({S.READY, S.WARMING, S.SUBSCRIBING, S.DRAINING})  # counted as ready
PARKED = frozenset({S.BACKOFF, S.FAILED})  # no worker, waiting for ``next_start_at``

# Entering these states is an event operators look for; every other transition logs at debug.
_EVENTS = {S.BACKOFF: "slot_backoff", S.FAILED: "slot_failed", S.GONE: "slot_retired"}
_LEVELS = {S.BACKOFF: "warning", S.FAILED: "error", S.GONE: "info"}


class IllegalTransition(RuntimeError):
    """A bug in the slot table: it tried a move the state table does not allow."""


@dataclass
class Slot:
    spec: SlotSpec
    state: State = State.STARTING
    since: float = 0.0  # monotonic time of the last transition
    proc: Proc | None = None  # the worker that owns the slot's session
    incoming: Proc | None = None  # a replacement, during WARMING and SUBSCRIBING (and DRAINING)
    next_spec: SlotSpec | None = None  # what the next worker runs (a reload, same slot)
    replace_reason: str = ""  # a rolling replace this slot is waiting for
    restarts: int = 0
    last_reason: str = ""
    consecutive_failures: int = 0
    failures: deque[float] = field(default_factory=deque)
    next_start_at: float = 0.0  # BACKOFF, FAILED: when to fork again
    counters_base: dict[str, Any] = field(default_factory=dict)  # totals of earlier workers
    restart_reasons: dict[str, int] = field(default_factory=dict)
    # RETIRING: sessions (by client id) that no worker has ended yet, and how many workers
    # were started to resume and end them
    drain: dict[str, SlotSpec] = field(default_factory=dict)
    drains: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.key

    @property
    def pool(self) -> str:
        return self.spec.route.name

    @property
    def live(self) -> list[Proc]:
        return [p for p in (self.proc, self.incoming) if p is not None]

    @property
    def retiring(self) -> bool:
        return self.state in (State.RETIRING, State.GONE)

    @property
    def shown(self) -> str:
        return SHOWN[self.state]

    def change_state(self, new: State, now: float, **fields: Any) -> None:
        """The one place a slot's state changes: legal moves only, and one log event each."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"slot {self.pool}[{self.spec.index}]: {old} -> {new}")
        self.state = new
        self.since = now
        event = _EVENTS.get(new)
        if event is None:
            log.debug("slot_state", pool=self.pool, slot=self.spec.index, old=old, new=new)
            return
        getattr(log, _LEVELS[new])(event, pool=self.pool, slot=self.spec.index, **fields)
