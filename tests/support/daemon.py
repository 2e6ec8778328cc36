"""Run ``routemqd run`` as a real process for a test, and always clean it up by PID.

The master and every worker PID it reports are tracked, so a test that fails half way still
leaves nothing running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from routemqd.control import request
from tests.support.processes import stop_pid, track_pid, untrack_pid


class Daemon:
    def __init__(
        self, manifest: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.manifest = manifest
        doc = yaml.safe_load(manifest.read_text())
        self.socket = str(
            (doc.get("control") or {}).get("socket") or manifest.parent / "control.sock"
        )
        self.log_path = manifest.parent / f"daemon-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "routemqd", "run", "-c", str(manifest), *args],
            env={**os.environ, "ROUTEMQD_LOG_FORMAT": "json", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        track_pid(self.proc.pid)
        self.worker_pids: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    # --------------------------------------------------------------------------- queries

    def status(self, timeout: float = 5) -> dict[str, Any]:
        reply = request(self.socket, {"cmd": "status"}, timeout=timeout)
        for s in reply.get("slots", []):
            if s.get("pid") and s["pid"] not in self.worker_pids:
                self.worker_pids.add(s["pid"])
                track_pid(s["pid"])
        return reply

    def control(self, **payload: Any) -> dict[str, Any]:
        return request(self.socket, payload)

    def pids(self) -> dict[tuple[str, int], int | None]:
        return {(s["route"], s["index"]): s["pid"] for s in self.status()["slots"]}

    def slot(self, route: str, index: int) -> dict[str, Any]:
        for s in self.status()["slots"]:
            if s["route"] == route and s["index"] == index:
                return s
        raise KeyError((route, index))

    def children(self) -> list[int]:
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        for k in kids:
            if k.pid not in self.worker_pids:
                self.worker_pids.add(k.pid)
                track_pid(k.pid)
        return [k.pid for k in kids]

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        """Until every slot that should run is ready and nothing is being replaced."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                last = self.status()
            except OSError:
                time.sleep(0.05)
                continue
            d = last["daemon"]
            settled = all(s["state"] == "ready" and not s["replacing"] for s in last["slots"])
            if d["startable"] > 0 and d["ready"] >= d["startable"] and settled:
                self.children()
                return last
            time.sleep(0.05)
        raise AssertionError(
            f"not ready within {timeout}s: {json.dumps(last)[:2000]}\n{self.log_tail()}"
        )

    def wait_for(
        self, predicate: Any, timeout: float = 30, what: str = "condition"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status = self.status()
                if predicate(status):
                    return status
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached within {timeout}s: {json.dumps(status)[:2000]}")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if name is None or e.get("event") == name:
                out.append(e)
        return out

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # ------------------------------------------------------------------------- actions

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def reload(self, timeout: float = 10) -> dict[str, Any]:
        """SIGHUP, then wait until the master has taken it (last_reload.at moves)."""
        before = (self.status()["daemon"]["last_reload"] or {}).get("at")
        self.signal(signal.SIGHUP)
        return self.wait_for(
            lambda s: (s["daemon"]["last_reload"] or {}).get("at") != before, timeout, "reload"
        )

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.children()
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        untrack_pid(self.pid)
        return rc

    def kill(self) -> None:
        """SIGKILL the master only (workers must notice on their own)."""
        self.children()
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        untrack_pid(self.pid)

    def close(self) -> None:
        self.children()
        if self.proc.poll() is None:
            stop_pid(self.pid, timeout=30)
            self.proc.wait(10)
        untrack_pid(self.pid)
        for pid in self.worker_pids:
            stop_pid(pid, timeout=5)
            untrack_pid(pid)
        self._log.close()
