"""Slots: what the master knows about each position in a pool, and the restart policy.

Everything here is plain data and pure functions on monotonic time, so the restart policy can be
tested without forking anything. The master (``master.py``) is the only place that acts on it.

States (supervisord-style, explicit, shown by ``routemqd status``):

    starting --ready--> ready --stop--> stopping --exit--> (gone, or respawned)
        \\                 \\--crash--> backoff --delay--> starting
         \\--boot failure / too many crashes--> failed --cooldown--> starting
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import psutil

from routemqd.board import InflightBoard
from routemqd.manifest import SupervisorConfig
from routemqd.plan import SlotSpec
from routemqd.protocol import LineReader


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"
    RETIRING = "retiring"


@dataclass
class Proc:
    """One forked worker process, as the master sees it."""

    pid: int
    spec: SlotSpec
    started_at: float
    status_fd: int
    command_fd: int
    reader: LineReader
    ps: psutil.Process | None
    create_time: float
    held: bool = False
    warm: bool = False
    ready_at: float | None = None
    connect_sent: bool = False
    last_heartbeat: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    stop_mode: str | None = None
    stop_reason: str = ""
    stop_deadline: float | None = None
    killed: bool = False
    boot_error: str = ""
    stuck_reported: bool = False
    cpu_high_since: float | None = None
    rss: int = 0
    cpu: float = 0.0
    board: InflightBoard | None = None  # what it is handling, readable after it dies


@dataclass
class Slot:
    spec: SlotSpec
    state: State = State.STARTING
    proc: Proc | None = None
    incoming: Proc | None = None  # a replacement warming up while ``proc`` still holds the session
    next_spec: SlotSpec | None = None  # what the next worker should run (reload, same session)
    replace_reason: str = ""  # a rolling replace this slot is waiting for
    retiring: bool = False  # remove this slot for good once its worker has retired
    restarts: int = 0
    last_reason: str = ""
    consecutive_failures: int = 0
    failures: deque[float] = field(default_factory=deque)
    next_start_at: float = 0.0
    counters_base: dict[str, float] = field(default_factory=dict)  # totals of earlier workers
    restart_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.key

    @property
    def live(self) -> list[Proc]:
        return [p for p in (self.proc, self.incoming) if p is not None]


@dataclass(frozen=True)
class Decision:
    state: State
    delay: float
    reason: str


def after_exit(
    slot: Slot,
    now: float,
    lived_healthy: bool,
    boot_failure: bool,
    cfg: SupervisorConfig,
    rng: random.Random | None = None,
    message_fault: bool = False,
) -> Decision:
    """What to do after an unexpected exit: restart now, back off, or park the slot as failed.

    The first crash restarts at once (a crashed slot's session keeps collecting its share of
    messages, so it must come back fast); a crash loop backs off exponentially with jitter; a slot
    that keeps failing, or fails in a way restarting cannot fix, waits out a cool-down in
    ``failed`` so it never becomes a restart storm.
    """
    rng = rng or random.Random()
    if message_fault and not boot_failure:
        # The worker died holding a message that max_attempts will give up before the failure
        # limit could park the slot: the death is the message's, the slot restarts at once.
        return Decision(State.STARTING, 0.0, "message in flight")
    if lived_healthy:
        slot.consecutive_failures = 0
        slot.failures.clear()
    slot.consecutive_failures += 1
    slot.failures.append(now)
    while slot.failures and now - slot.failures[0] > cfg.failure_window:
        slot.failures.popleft()
    if boot_failure:
        return Decision(State.FAILED, cfg.failed_cooldown, "boot failure")
    if len(slot.failures) >= cfg.failure_limit:
        return Decision(
            State.FAILED,
            cfg.failed_cooldown,
            f"{len(slot.failures)} failures within {cfg.failure_window:g}s",
        )
    if slot.consecutive_failures == 1:
        return Decision(State.STARTING, 0.0, "first failure")
    return Decision(State.BACKOFF, backoff_delay(slot.consecutive_failures, cfg, rng), "backoff")


def backoff_delay(consecutive: int, cfg: SupervisorConfig, rng: random.Random) -> float:
    """Exponential from ``backoff_initial`` for the second failure on, capped, +/-20 % jitter."""
    base = min(cfg.backoff_max, cfg.backoff_initial * (2 ** max(0, consecutive - 2)))
    return min(cfg.backoff_max, base * rng.uniform(0.8, 1.2))
