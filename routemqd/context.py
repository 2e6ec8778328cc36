"""The per-worker context: who this worker is, and a place for what ``setup`` opens.

A worker process runs exactly one slot for its whole life, so the context is a process-wide
singleton made once after the fork. That is also why the handler can reach it for free:
``message.context`` is a class-level property that returns the singleton, so a delivery costs no
extra attribute store, and a route without hooks pays nothing at all.

What users see::

    def setup(ctx):                      # once per worker, after the fork, before subscribing
        ctx.state.db = psycopg.connect(DSN)

    def handle(message):
        db = message.context.state.db    # the same object, in the same process

    def teardown(ctx):                   # graceful stop, after the last message was acknowledged
        ctx.state.db.close()

The identity fields are frozen (a hook cannot rename its slot by accident); ``state`` is a plain
namespace that belongs to user code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from routemqd.plan import SlotSpec


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """One worker's identity, a logger bound to it, and ``state`` for user objects.

    ``route`` is the route's name, ``slot`` its index in the pool (0 for an ordered route),
    ``client_id`` the MQTT client id the slot keeps across restarts, ``log`` a structlog logger
    with ``pool``, ``slot`` and ``pid`` bound, so hook and handler logs read like the daemon's.
    """

    route: str
    slot: int
    pid: int
    client_id: str
    host_id: str
    log: Any
    state: SimpleNamespace = field(default_factory=SimpleNamespace)

    @property
    def label(self) -> str:
        return f"{self.route}[{self.slot}]"


_current: WorkerContext | None = None


def make_context(spec: SlotSpec, log: Any = None) -> WorkerContext:
    """Make this process's context and install it as :func:`current`. Call once, in the worker,
    after the fork (the pid is the worker's own)."""
    global _current
    pid = os.getpid()
    if log is None:
        log = structlog.get_logger("routemqd.handler").bind(
            pool=spec.route.name, slot=spec.index, pid=pid
        )
    _current = WorkerContext(
        route=spec.route.name,
        slot=spec.index,
        pid=pid,
        client_id=spec.client_id,
        host_id=spec.host_id,
        log=log,
    )
    return _current


def current() -> WorkerContext:
    """The context of the worker this code runs in; RuntimeError outside a worker (a unit test
    calling a handler directly can install one with :func:`install`)."""
    ctx = _current
    if ctx is None:
        raise RuntimeError("no worker context: this code is not running in a routemqd worker")
    return ctx


def install(ctx: WorkerContext | None) -> WorkerContext | None:
    """Replace the process's context (tests, and ``routemqd worker`` run from a terminal);
    returns the previous one."""
    global _current
    previous, _current = _current, ctx
    return previous
