"""The worker's side of a route's ``setup`` and ``teardown``: how a failure is reported, and
heartbeats while the main thread is busy in a hook.

Loading, the kind rules and the bounded runs themselves are :mod:`routemqd.hooks` (shared with
``check``); :mod:`routemqd.worker.lifecycle` decides when they run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from routemqd.exitcodes import ExitCode
from routemqd.hooks import HookFailure
from routemqd.protocol import Event


def report(failure: HookFailure, log: Any, emit: Callable[[dict[str, Any]], None]) -> None:
    """Log a hook's failure; a setup failure is also the ``boot_error`` the master shows in
    ``status`` (it parks the slot in ``failed``). May run on the watchdog's thread."""
    if failure.code is ExitCode.SETUP_FAILED:
        log.error("setup_failed", reason=failure.reason, detail=failure.detail or None)
        emit({"t": Event.BOOT_ERROR, "code": int(failure.code), "reason": failure.reason})
    else:
        event = "teardown_timeout" if failure.code else "teardown_failed"
        log.error(event, reason=failure.reason, detail=failure.detail or None)


@contextlib.contextmanager
def beating(heartbeat: Callable[[float], None], until_next: Callable[[], float]) -> Iterator[None]:
    """Heartbeats from a helper thread while the block runs: the master judges a silent worker
    frozen after ``heartbeat_timeout``, while a slow hook has its own bound. A process that is
    really frozen (C code holding the GIL) stops these too, so the master still catches it."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(until_next()):
            heartbeat(time.monotonic())

    thread = threading.Thread(target=beat, name="routemqd-hook-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(1.0)
