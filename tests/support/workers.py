"""Start one worker process directly (no master), talk to it over its two pipes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.processes import stop_pid, track_pid, untrack_pid


class WorkerProc:
    def __init__(
        self,
        manifest: Path,
        route: str,
        slot: int = 0,
        env: dict[str, str] | None = None,
        hold: bool = False,
    ) -> None:
        self.status_r, status_w = os.pipe()
        command_r, self.command_w = os.pipe()
        args = [
            sys.executable,
            "-m",
            "routemqd",
            "worker",
            "-c",
            str(manifest),
            "--route",
            route,
            "--slot",
            str(slot),
            "--status-fd",
            str(status_w),
            "--command-fd",
            str(command_r),
        ]
        if hold:
            args.append("--hold")
        self.proc = subprocess.Popen(
            args,
            pass_fds=(status_w, command_r),
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
        )
        track_pid(self.proc.pid)
        os.close(status_w)
        os.close(command_r)
        os.set_blocking(self.status_r, False)
        self._buf = b""
        self.events: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll_events(self) -> list[dict[str, Any]]:
        try:
            while chunk := os.read(self.status_r, 65536):
                self._buf += chunk
        except BlockingIOError:
            pass
        *lines, self._buf = self._buf.split(b"\n")
        new = [json.loads(line) for line in lines if line]
        self.events.extend(new)
        return new

    def wait_event(self, kind: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            self.poll_events()
            for e in self.events[seen:]:
                if e.get("t") == kind:
                    return e
            seen = len(self.events)
            if self.proc.poll() is not None and not self.poll_events():
                raise AssertionError(f"worker exited with {self.proc.returncode} before {kind!r}")
            time.sleep(0.02)
        raise AssertionError(f"no {kind!r} event from worker within {timeout}s: {self.events[-3:]}")

    def heartbeats(self) -> list[dict[str, Any]]:
        """Every heartbeat received so far, oldest first."""
        self.poll_events()
        return [e for e in self.events if e.get("t") == "hb"]

    def wait_heartbeat(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        """The first heartbeat sent after this call that satisfies ``predicate``."""
        self.poll_events()
        seen = len(self.events)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll_events()
            for e in self.events[seen:]:
                if e.get("t") == "hb" and predicate(e):
                    return e
            seen = len(self.events)
            if self.proc.poll() is not None and not self.poll_events():
                raise AssertionError(f"worker exited with {self.proc.returncode}")
            time.sleep(0.02)
        last = self.heartbeats()[-1:]
        raise AssertionError(f"no matching heartbeat within {timeout}s; last: {last}")

    def command(self, **cmd: Any) -> None:
        os.write(self.command_w, json.dumps(cmd).encode() + b"\n")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        rc = self.proc.wait(timeout)
        untrack_pid(self.pid)
        return rc

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            stop_pid(self.pid, timeout=10)
            self.proc.wait(10)
        untrack_pid(self.pid)
        for fd in (self.status_r, self.command_w):
            with contextlib.suppress(OSError):
                os.close(fd)
