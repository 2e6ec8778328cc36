"""PID bookkeeping for processes that test and benchmark helpers start.

Other processes on the machine (a system mosquitto on port 1883, other
engineers' brokers and workers) must never be touched, so everything here
works strictly by PID: nothing is looked up or stopped by name.  Helpers call
:func:`track_pid` for every process they start; :func:`stop_tracked` is the
safety net that stops whatever is still running when the test session (or a
benchmark script) ends, so a failing test cannot leak a broker.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time

import psutil

#: How long to wait for a process to disappear after SIGKILL.  SIGKILL cannot
#: be caught, so only a process stuck in the kernel takes longer than this.
KILL_GRACE = 5.0

_POLL_INTERVAL = 0.02

_lock = threading.Lock()
# pid -> process start time, so a PID the kernel has since reused for an
# unrelated process is never signalled.
_tracked: dict[int, float | None] = {}
_atexit_registered = False


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def track_pid(pid: int) -> None:
    """Register a PID to be stopped by :func:`stop_tracked` if still running.

    The first call also registers :func:`stop_tracked` with :mod:`atexit`, so
    benchmark scripts that die on an exception do not leave brokers behind.
    """
    global _atexit_registered
    with _lock:
        _tracked[pid] = _create_time(pid)
        if not _atexit_registered:
            atexit.register(stop_tracked)
            _atexit_registered = True


def untrack_pid(pid: int) -> None:
    """Forget a PID whose owner has stopped and reaped it itself."""
    with _lock:
        _tracked.pop(pid, None)


def tracked_pids() -> list[int]:
    """The PIDs currently registered, for diagnostics and tests."""
    with _lock:
        return list(_tracked)


def _is_gone(pid: int) -> bool:
    """True once ``pid`` has exited; reaps it if it is our child.

    Reaping matters: an unreaped child stays a zombie that still "exists" for
    ``kill(pid, 0)`` and keeps its PID reserved.
    """
    try:
        reaped, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child, or already reaped: fall through to probing
    else:
        return reaped == pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists but belongs to another user
    try:
        # Someone else's zombie has exited even though its PID still exists.
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if _is_gone(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)


def _signal(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig``; False if the process no longer exists."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """Stop ``pid``: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

    SIGTERM comes first because a graceful exit is what lets mosquitto write
    its persistence file.  The process is reaped if it is our child.  Returns
    True once the process is gone, False if it survived SIGKILL for
    :data:`KILL_GRACE` seconds (stuck in the kernel).
    """
    if _is_gone(pid) or not _signal(pid, signal.SIGTERM):
        untrack_pid(pid)
        return True
    if not _wait_gone(pid, timeout):
        _signal(pid, signal.SIGKILL)
        if not _wait_gone(pid, KILL_GRACE):
            return False
    untrack_pid(pid)
    return True


def stop_tracked(timeout: float = 10.0) -> list[int]:
    """Stop every tracked PID that is still running; return those it stopped.

    A PID whose start time no longer matches the one recorded by
    :func:`track_pid` belongs to an unrelated process and is left alone.
    """
    with _lock:
        entries = list(_tracked.items())
    stopped = []
    for pid, created in entries:
        if _is_gone(pid):
            untrack_pid(pid)
            continue
        if created is not None and _create_time(pid) not in (None, created):
            untrack_pid(pid)
            continue
        with contextlib.suppress(OSError):
            if stop_pid(pid, timeout):
                stopped.append(pid)
    return stopped
