"""structlog set-up: JSON lines when not on a terminal (journald, shippers), readable on a tty.

Every event is written with one ``write()`` so lines from the master and its forked workers,
which share the same stdout, never interleave mid-line. Known secrets are scrubbed from every
event as a last line of defence: the code never logs them on purpose, but an exception message
from a library might quote a connection string.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_secrets: tuple[str, ...] = ()
REDACTED = "<hidden>"


class LogSink:
    """A file-like target that can be reopened (SIGUSR1 after logrotate moved the file)."""

    def __init__(self, path: str | None = None, stream: TextIO | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stream: TextIO = stream or sys.stdout
        if path is not None:
            self._stream = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, text: str) -> None:
        with self._lock:
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed terminal must not kill the daemon

    def flush(self) -> None:
        pass

    def reopen(self) -> None:
        if self.path is None:
            return
        with self._lock:
            old = self._stream
            self._stream = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            old.close()

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False


_sink = LogSink()


def sink() -> LogSink:
    return _sink


def set_secrets(secrets: Iterable[str]) -> None:
    global _secrets
    _secrets = tuple(s for s in secrets if s)


def redact(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def _redact_processor(logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
    if not _secrets:
        return event
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
        elif value is not None and not isinstance(value, int | float | bool):
            text = str(value)
            red = redact(text)
            if red != text:
                event[key] = red
    return event


_process_fields: dict[str, Any] = {}


def set_process_fields(**fields: Any) -> None:
    """Key-values every event of this process carries, from whichever thread logs it: a worker
    sets ``pool``, ``slot`` and ``pid`` once, so a handler's own structlog events (on the socket
    thread, a pool runner or the event loop) and its hooks' (on the main thread) name their slot.
    Context variables would not do: a new thread starts with an empty context."""
    _process_fields.clear()
    _process_fields.update(fields)


def _add_process_fields(logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
    for key, value in _process_fields.items():
        event.setdefault(key, value)
    return event


def _event_first(logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
    """timestamp, level, event, then the key-values: what a person scans for comes first."""
    head = {k: event.pop(k) for k in ("timestamp", "level", "event") if k in event}
    head.update(event)
    return head


def configure(level: str = "info", fmt: str = "auto", file: str | None = None) -> None:
    global _sink
    _sink = LogSink(path=file) if file else LogSink(stream=sys.stdout)
    use_json = fmt == "json" or (fmt == "auto" and not _sink.isatty())
    if os.environ.get("ROUTEMQD_LOG_FORMAT") in ("json", "console"):
        use_json = os.environ["ROUTEMQD_LOG_FORMAT"] == "json"
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=_sink.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_processor,
            _event_first,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=_sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get(name: str = "routemqd", **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound)
