"""Settings a reload cannot apply: they are read once, when the master starts.

The control socket and the metrics listener are bound at start-up and logging is configured
then; everything else in the manifest (routes, broker, python_path, host_id, group, supervisor
timings) is applied by a reload, pool by pool. A reload that changes one of these must say so
instead of reporting a plain "ok" (DESIGN invariant 11): compare the manifest the running
services were set up from with the new one.
"""

from __future__ import annotations

from collections.abc import Callable

from routemqd.manifest import Manifest


def _metrics_listen(m: Manifest) -> str | None:
    return f"{m.metrics.host}:{m.metrics.port}" if m.metrics is not None else None


# (setting as written in the manifest, how to read it)
RESTART_ONLY: tuple[tuple[str, Callable[[Manifest], object]], ...] = (
    ("control.socket", lambda m: m.control.socket),
    ("control.mode", lambda m: m.control.mode if m.control.mode_given else None),
    ("metrics.listen", _metrics_listen),
    ("logging.level", lambda m: m.logging.level),
    ("logging.format", lambda m: m.logging.format),
    ("logging.file", lambda m: m.logging.file),
)


def restart_needed(running: Manifest, new: Manifest) -> tuple[str, ...]:
    """The settings that differ between ``running`` (what the master started with) and ``new``
    and that only a restart applies, in manifest order."""
    return tuple(name for name, read in RESTART_ONLY if read(running) != read(new))
