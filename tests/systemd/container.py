"""A Debian 12 container whose PID 1 is a real systemd, driven from the host with nsenter.

systemd-nspawn boots the cached root file system (scripts/systemd-test-rootfs) with a throw-away
overlay on top (--volatile=overlay), so every run starts from the same tree and nothing it does
stays. --private-network leaves the container only its own loopback: the Mosquitto in it never
meets the host's. --keep-unit --register=no because the host's PID 1 is not systemd.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil

from tests.support.processes import stop_pid, track_pid, untrack_pid

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(Exception):
    pass


class Container:
    def __init__(self, rootfs: Path, binds: dict[Path, str], log: Path) -> None:
        self.rootfs = rootfs
        self.binds = binds
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120.0) -> None:
        cmd = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.rootfs}",
            "--volatile=overlay",
            "--private-network",
            "--keep-unit",
            "--register=no",
            f"--machine=routemqd-test-{os.getpid()}",
            *(f"--bind={host}:{inside}" for host, inside in self.binds.items()),
            "--boot",
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        track_pid(self.proc.pid)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited {self.proc.returncode}: {self._tail()}"
                )
            if time.monotonic() > deadline:
                raise ContainerError(f"no systemd in the container: {self._tail()}")
            for child in psutil.Process(self.proc.pid).children():
                if child.name() == "systemd":
                    self.leader = child.pid
            time.sleep(0.1)
        # the leader may not have set up its namespaces or D-Bus yet: ask until it answers
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise ContainerError(f"the container's systemd is {state!r}: {self._tail()}")
            r = self.run("systemctl is-system-running --wait", check=False, timeout=timeout)
            state = r.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.5)

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def run(
        self, script: str, *, check: bool = True, timeout: float = 120.0, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a bash script inside the container (as root, or as ``user``)."""
        inner = ["bash", "-euo", "pipefail", "-c", script]
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        cmd = [
            "nsenter",
            f"--target={self.leader}",
            "--all",
            "env",
            "-i",
            f"PATH={PATH}",
            "HOME=/root",
            "LANG=C.UTF-8",
            *inner,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise ContainerError(
                f"exit {r.returncode}: {script}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            )
        return r

    def wait_for(self, script: str, timeout: float = 60.0, what: str = "") -> str:
        """Re-run ``script`` until it exits 0 (bounded); its output."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.run(script, check=False, timeout=timeout)
            if r.returncode == 0:
                return r.stdout
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"timed out waiting for {what or script}: {r.stdout}{r.stderr}"
                )
            time.sleep(0.2)

    def shutdown(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # nspawn turns SIGTERM into an orderly shutdown of the container's systemd
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_pid(self.proc.pid, timeout=10)
        untrack_pid(self.proc.pid)
        self.proc = None
