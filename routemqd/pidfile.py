"""A pidfile written atomically, removed on exit, and a stale one recognised as stale.

Atomic (write a temporary file, then rename) so a reader never sees a half-written PID. A pidfile
whose PID is dead, or belongs to a process that is not routemqd (the PID was reused after a
crash), is stale and replaced; one that names a live routemqd is a second daemon: refuse.
"""

from __future__ import annotations

import contextlib
import os

import psutil


class PidFileError(Exception):
    pass


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.owned = False

    def read(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        other = self.read()
        if other is not None and other != os.getpid() and _is_routemqd(other):
            raise PidFileError(f"{self.path}: routemqd is already running as PID {other}")
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.path)
        self.owned = True

    def release(self) -> None:
        if self.owned and self.read() == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.owned = False


def _is_routemqd(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        text = " ".join(p.cmdline()) + " " + p.name()
    except psutil.Error:
        return False
    return "routemqd" in text
