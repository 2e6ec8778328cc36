"""What systemd hears from the master: READY=1 once, STATUS= on change, WATCHDOG=1 on time.

READY=1 goes out when every startable slot is ready (or after STARTUP_READY_TIMEOUT, so a broker
that is down does not fail the unit's start), and again at the end of each reload, once the new
workers are up: ``systemctl reload`` waits for it.
"""

from __future__ import annotations

import structlog

from routemqd.notify import Notifier
from routemqd.views import summary_line

log = structlog.get_logger("routemqd.master")

STARTUP_READY_TIMEOUT = 30.0  # tell systemd READY even if the broker is not there yet


class Readiness:
    def __init__(self, notifier: Notifier, watchdog_every: float | None, started: float) -> None:
        self.notifier = notifier
        self.watchdog_every = watchdog_every
        self.started = started
        self.next_watchdog = 0.0
        self.ready_notified = False
        self.reload_ready_due: float | None = None  # READY=1 owed to systemd after a reload
        self.status_line = ""

    def reload_applied(self, now: float) -> None:
        self.reload_ready_due = now + STARTUP_READY_TIMEOUT

    def next_wake(self) -> list[float]:
        return [self.next_watchdog] if self.watchdog_every else []

    def update(
        self,
        now: float,
        ready: int,
        startable: int,
        failed: int,
        reload_ok: bool,
        replacing: bool,
    ) -> None:
        summary = summary_line(ready, startable, failed, reload_ok)
        log_ready = False
        if not self.ready_notified and (
            ready >= startable or now - self.started > STARTUP_READY_TIMEOUT
        ):
            self.ready_notified = log_ready = True
            self.status_line = summary
            self.notifier.ready(self.status_line)
        if self.reload_ready_due is not None and (
            (ready >= startable and not replacing) or now >= self.reload_ready_due
        ):
            self.reload_ready_due = None
            self.status_line = summary
            self.notifier.ready(self.status_line)
        if summary != self.status_line:
            self.status_line = summary
            self.notifier.status(summary)
        if self.watchdog_every and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_every
        if log_ready:
            startup_ms = round((now - self.started) * 1000, 1)
            log.info("master_ready", summary=summary, startup_ms=startup_ms)


def set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
