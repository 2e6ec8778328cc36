"""A real mosquitto broker as a child process, for tests and benchmarks.

routemqd's no-loss promise depends on broker behaviour (persistence, queue
limits, in-flight windows) that a mock cannot reproduce, so tests run against
the real broker configured by ``etc/mosquitto.conf``.  :class:`Broker` starts
that configuration on a private loopback port with its persistence database
and log in a private directory, which keeps it clear of the system broker on
port 1883 and of other tests.  Processes are only ever signalled by the PID
this class started.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.processes import KILL_GRACE, track_pid, untrack_pid

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO_ROOT / "etc" / "mosquitto.conf"
FALLBACK_BINARY = Path("/usr/sbin/mosquitto")

#: Options of the base config that are rewritten per broker instance.
_REWRITTEN = frozenset({"listener", "persistence_location", "log_dest", "user", "pid_file"})

#: Printed by mosquitto once every listener is bound and it is serving.
_READY_MARKER = " running"
_BIND_FAILURE_MARKER = "Address already in use"
_START_ATTEMPTS = 5
_POLL_INTERVAL = 0.02


class BrokerError(RuntimeError):
    """The broker could not be found, started or stopped."""


def find_mosquitto() -> Path:
    """Locate the mosquitto binary.

    ``/usr/sbin`` is often missing from an unprivileged user's PATH, hence
    the fallback.
    """
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    if os.access(FALLBACK_BINARY, os.X_OK):
        return FALLBACK_BINARY
    raise BrokerError(
        "mosquitto binary not found on PATH or at /usr/sbin/mosquitto; "
        "install it with `apt-get install mosquitto` (the Makefile does this)"
    )


def _pick_free_port(host: str) -> int:
    """Ask the kernel for a free port on ``host``.

    The port is released before mosquitto binds it, so another process can
    take it in between; :meth:`Broker.start` retries on a bind failure.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    """One mosquitto process running ``etc/mosquitto.conf`` on a private port.

    ``workdir`` holds the generated config, the persistence database and the
    log, so a restart (or a start after :meth:`kill`) finds the sessions the
    previous process saved.  ``port=0`` picks a free loopback port at the
    first start and then keeps it, because clients reconnecting after a
    restart must find the broker where it was.
    """

    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    extra_config: str = ""
    pid: int | None = field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()

    # -- paths and configuration ------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for MQTT clients; the port is known after start."""
        return (self.host, self.port)

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def db_path(self) -> Path:
        return self.workdir / "mosquitto.db"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def render_config(self) -> str:
        """The base config with listener, persistence and logging made private.

        The listener line is replaced in place so per-listener options that
        follow it in the base config still apply to it.  ``user root`` is
        added only when running as root: otherwise mosquitto would switch to
        the ``mosquitto`` user, which cannot write a workdir under a
        root-only temp directory, and every save would fail.
        """
        out: list[str] = []
        listener_done = False
        for line in BASE_CONFIG.read_text().splitlines():
            words = line.split()
            option = words[0] if words and not words[0].startswith("#") else None
            if option not in _REWRITTEN:
                out.append(line)
            elif option == "listener" and not listener_done:
                out.append(f"listener {self.port} {self.host}")
                listener_done = True
        if not listener_done:
            raise BrokerError(f"{BASE_CONFIG} has no listener line to rewrite")
        out += [
            "",
            "# Per-instance settings added by tests/support/broker.py",
            f"persistence_location {self.workdir}",
            f"log_dest file {self.log_path}",
        ]
        if os.geteuid() == 0:
            out.append("user root")
        if self.extra_config:
            out += ["", "# extra_config", self.extra_config.strip()]
        return "\n".join(out) + "\n"

    def setting(self, name: str) -> str | None:
        """Effective value of a global option (the last occurrence wins)."""
        value = None
        for line in self.render_config().splitlines():
            words = line.split(maxsplit=1)
            if len(words) == 2 and words[0] == name:
                value = words[1].strip()
        return value

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of the broker log, for error messages."""
        try:
            with self.log_path.open(errors="replace") as fh:
                return "".join(deque(fh, maxlen=n))
        except FileNotFoundError:
            return ""

    # -- lifecycle --------------------------------------------------------

    def start(self, timeout: float = 10) -> None:
        """Start mosquitto and return once its port accepts TCP connections.

        Retries with a fresh port when an auto-picked port was taken between
        choosing and binding it; a fixed port (given, or kept from an earlier
        start) is retried as is, since clients expect the broker there.
        """
        if self.running:
            raise BrokerError(f"broker already running with pid {self.pid}")
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        auto_port = self.port == 0
        deadline = time.monotonic() + timeout
        try:
            for attempt in range(1, _START_ATTEMPTS + 1):
                if auto_port:
                    self.port = _pick_free_port(self.host)
                try:
                    self._launch(binary, deadline)
                    return
                except _BindFailedError:
                    if attempt == _START_ATTEMPTS or time.monotonic() >= deadline:
                        raise BrokerError(
                            f"mosquitto could not bind {self.host}:{self.port} "
                            f"after {attempt} attempts\n{self.log_tail()}"
                        ) from None
                    if not auto_port:
                        time.sleep(0.2)
        except BaseException:
            if auto_port:
                self.port = 0  # nothing ever listened there; pick afresh next time
            raise

    def _launch(self, binary: Path, deadline: float) -> None:
        """Run one mosquitto process and wait for it to serve or fail."""
        self.config_path.write_text(self.render_config())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # stdout/stderr go to the same log so errors mosquitto prints before
        # it opens its log file (bad config, unwritable paths) are kept too.
        command = [str(binary), "-c", str(self.config_path)]
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
            )
        track_pid(proc.pid)
        self._proc, self.pid = proc, proc.pid
        while True:
            returncode = proc.poll()
            if returncode is not None:
                self._forget(proc)
                new_output = self._log_since(log_offset)
                if _BIND_FAILURE_MARKER in new_output:
                    raise _BindFailedError
                raise BrokerError(
                    f"mosquitto exited with status {returncode} during start; "
                    f"command: {shlex.join(command)}\n{self.log_tail()}"
                )
            if _READY_MARKER in self._log_since(log_offset) and _accepts_tcp(self.host, self.port):
                return
            if time.monotonic() >= deadline:
                self._terminate(proc, timeout=KILL_GRACE)
                raise BrokerError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} "
                    f"in time\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        untrack_pid(proc.pid)
        if self._proc is proc:
            self._proc, self.pid = None, None

    def _terminate(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """SIGTERM, wait, SIGKILL; always by the PID we started.

        Popen only signals a process it has not reaped yet, so the PID
        cannot have been reused by an unrelated process.
        """
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                try:
                    proc.wait(KILL_GRACE)
                except subprocess.TimeoutExpired:
                    raise BrokerError(
                        f"mosquitto pid {proc.pid} survived SIGKILL for {KILL_GRACE} s"
                    ) from None
        self._forget(proc)

    def stop(self, timeout: float = 10) -> None:
        """Stop gracefully (SIGTERM), so mosquitto saves its database first.

        Falls back to SIGKILL after ``timeout`` seconds.  Does nothing if the
        broker is not running, so teardown code can always call it.
        """
        if self._proc is not None:
            self._terminate(self._proc, timeout)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would: nothing is saved on the way out.

        Waits for the process to be reaped so the port is free for a start.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                raise BrokerError(
                    f"mosquitto pid {proc.pid} survived SIGKILL for {KILL_GRACE} s"
                ) from None
        self._forget(proc)

    def restart(self, timeout: float = 10) -> None:
        """Graceful stop then start on the same port and persistence database."""
        self.stop(timeout)
        self.start(timeout)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _BindFailedError(Exception):
    """mosquitto exited because its port was taken."""


__all__ = ["BASE_CONFIG", "REPO_ROOT", "Broker", "BrokerError", "find_mosquitto"]
