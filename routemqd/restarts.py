"""The restart policy: after a worker died, restart now, back off, or park the slot in ``failed``.

Pure functions on monotonic time and a seeded random source, so every branch is tested without
forking anything. The slot table applies the :class:`Decision` with one ``change_state()``.

Who is to blame decides the policy. A worker that died with a message on its in-flight board
(see :mod:`routemqd.board`) was most likely killed by that message: the death counts against the
message (``max_attempts``, then dead-letter or drop), and the slot restarts at once, because
backing off or parking it would stop the whole pool for one bad message. A death with nothing in
flight (a boot failure, an idle crash, a broken broker login) is the slot's: the first restarts
at once, a crash loop backs off exponentially with jitter, and a slot that keeps failing waits
out a cool-down in ``failed`` so it never becomes a restart storm.

The message takes the blame only while ``max_attempts`` gives it up no later than the slot's own
``failure_limit`` would: a route that sets ``max_attempts`` above it has chosen to keep retrying
messages, and then the slot's crash-loop protection applies to those deaths as well.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from routemqd.manifest import Route, SupervisorConfig
from routemqd.slots import Slot, State

FORK_RETRY = 1.0  # seconds before forking again after fork() itself failed


class RestartReason(StrEnum):
    """The ``reason`` label of ``routemqd_worker_restarts_total``."""

    CRASH = "crash"
    STUCK = "stuck"  # stuck or frozen, killed by the master
    BOOT_FAILURE = "boot_failure"
    MEMORY = "memory"
    CPU = "cpu"
    RELOAD = "reload"
    RESTART = "restart"  # ``routemqd restart``
    REPLACE = "replace"


def replace_kind(reason: str) -> RestartReason:
    """The label of a planned replacement, from the reason the slot table gave it."""
    if reason.startswith("rss"):
        return RestartReason.MEMORY
    if reason.startswith("cpu"):
        return RestartReason.CPU
    if reason == "manifest changed" or reason.startswith("replaced by"):
        return RestartReason.RELOAD
    return RestartReason.RESTART if reason.startswith("restart") else RestartReason.REPLACE


@dataclass(frozen=True)
class Decision:
    state: State
    delay: float
    reason: str


def message_to_blame(charged: bool, route: Route, cfg: SupervisorConfig) -> bool:
    """``charged``: the dead worker had messages in flight and each got one more attempt."""
    return charged and route.max_attempts <= cfg.failure_limit


def after_exit(
    slot: Slot,
    now: float,
    lived_healthy: bool,
    boot_failure: bool,
    cfg: SupervisorConfig,
    rng: random.Random | None = None,
    message_fault: bool = False,
) -> Decision:
    """What to do after an unexpected exit; updates the slot's failure history."""
    rng = rng or random.Random()
    if message_fault and not boot_failure:
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
