"""The master's signals, named once: ``routemqd run`` blocks them from its first instant and the
loop unblocks them once its handlers are installed, so the two lists can never disagree.

Handlers only wake the loop (DESIGN invariant 2): Python's wakeup fd records the signal number in
a pipe the loop reads, and the loop dispatches ``handle_<name>``.
"""

from __future__ import annotations

import signal

# signal -> the name of the loop's handler method, ``handle_<name>``
HANDLED: dict[signal.Signals, str] = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGCHLD: "chld",
    signal.SIGUSR1: "usr1",
}
MASTER_SIGNALS: tuple[signal.Signals, ...] = tuple(HANDLED)
IGNORED: tuple[signal.Signals, ...] = (signal.SIGUSR2,)  # a worker's retire signal, not ours


def handler_name(signum: int) -> str | None:
    try:
        return HANDLED.get(signal.Signals(signum))
    except ValueError:
        return None


def wake_only(signum: int, frame: object) -> None:
    """Signal handlers do nothing: Python's wakeup fd has already recorded the signal."""


def reset_in_child() -> None:
    """A forked worker starts with the default dispositions and no wakeup fd of the master's."""
    signal.set_wakeup_fd(-1)
    for sig in (*MASTER_SIGNALS, *IGNORED):
        signal.signal(sig, signal.SIG_DFL)
