"""What systemd hears from the master: READY=1 once, STATUS= on change, WATCHDOG=1 on time.

READY=1 goes out when every startable slot is ready, and again at the end of each reload, once
the new workers are up: ``systemctl reload`` waits for it. If they are not up after
``supervisor.ready_timeout`` (the broker is down, say), READY=1 goes out anyway: failing the
unit's start would only make systemd restart a daemon that reconnects by itself when the broker
is back, and STATUS= says what the workers are waiting for.
"""

from __future__ import annotations

import structlog

from routemqd.notify import Notifier
from routemqd.views import summary_line

log = structlog.get_logger("routemqd.master")


class Readiness:
    def __init__(
        self,
        notifier: Notifier,
        watchdog_every: float | None,
        started: float,
        ready_timeout: float = 30.0,
    ) -> None:
        self.notifier = notifier
        self.ready_timeout = ready_timeout
        self.watchdog_every = watchdog_every
        self.started = started
        self.next_watchdog = 0.0
        self.ready_notified = False
        self.reload_ready_due: float | None = None  # READY=1 owed to systemd after a reload
        self.status_line = ""

    def reload_applied(self, now: float) -> None:
        self.reload_ready_due = now + self.ready_timeout

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
        waiting: str = "",
    ) -> None:
        summary = summary_line(ready, startable, failed, reload_ok, waiting)
        log_ready = False
        if not self.ready_notified and (
            ready >= startable or now - self.started > self.ready_timeout
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
            if ready >= startable:
                log.info("master_ready", summary=summary, startup_ms=startup_ms)
            else:
                log.warning(
                    "master_ready",
                    summary=summary,
                    startup_ms=startup_ms,
                    reason=f"not every worker was ready after ready_timeout "
                    f"{self.ready_timeout:g}s",
                )


def set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
