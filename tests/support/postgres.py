"""A private PostgreSQL server for tests: its own cluster in a temp dir, on a free loopback port.

Exactly-once claims are about what a real database commits, so the PostgreSQL tests use a real
server, never a mock, and never the machine's own server on 5432 (or any other that happens to
run). :class:`Postgres` runs Debian's binaries (``initdb``, ``pg_ctl`` from
``/usr/lib/postgresql/<version>/bin``, not on PATH) on a cluster it creates, with the Unix socket
in that directory too. ``initdb`` refuses to run as root, so as root both run as the ``postgres``
user the package creates, through ``runuser``. ``pg_ctl`` detaches the server, so it is tracked
and stopped by the PID in ``postmaster.pid``, nothing else.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.broker import _pick_free_port
from tests.support.processes import KILL_GRACE, _signal, _wait_gone, track_pid, untrack_pid

PG_ROOT = Path("/usr/lib/postgresql")
SERVICE_USER = "postgres"
_START_ATTEMPTS = 5
_POLL_INTERVAL = 0.02
#: The cluster is thrown away after the session: durability settings only cost time here.
_FAST_SETTINGS = ("fsync=off", "full_page_writes=off", "max_connections=200")


class PostgresError(RuntimeError):
    """The server could not be found, started or stopped."""


def find_bindir() -> Path:
    """The newest installed server's bin directory (Debian 12 ships 15)."""
    candidates = sorted(
        (p / "bin" for p in PG_ROOT.glob("*") if (p / "bin" / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise PostgresError(
            f"no PostgreSQL server under {PG_ROOT}/*/bin; install it with "
            "`apt-get install postgresql` (scripts/system-deps does this)"
        )
    return candidates[-1]


@dataclass
class Postgres:
    """One throwaway cluster. ``dsn`` is valid once :meth:`start` returned."""

    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path | None = None
    pid: int | None = field(default=None, init=False)
    _owned_dir: bool = field(default=False, init=False, repr=False)

    @property
    def data_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={SERVICE_USER} dbname={dbname}"

    # -- lifecycle --------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        if self.pid is not None:
            raise PostgresError(f"postgres already running with pid {self.pid}")
        bindir = find_bindir()
        if self.workdir is None:
            # a short path of its own: the socket path has a 107-byte limit, and pytest's tmp
            # dirs are root-only, which the postgres user could not enter
            self.workdir = Path(tempfile.mkdtemp(prefix="rmq-pg-"))
            self._owned_dir = True
        self._chown(self.workdir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-A",
                    "trust",
                    "-U",
                    SERVICE_USER,
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                timeout,
            )
        auto_port = self.port == 0
        deadline = time.monotonic() + timeout
        for attempt in range(1, _START_ATTEMPTS + 1):
            if auto_port:
                self.port = _pick_free_port(self.host)
            if self._launch(bindir, deadline):
                return
            if not auto_port or attempt == _START_ATTEMPTS or time.monotonic() >= deadline:
                break
        raise PostgresError(f"postgres did not start on {self.host}:{self.port}\n{self.log_tail()}")

    def _launch(self, bindir: Path, deadline: float) -> bool:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.workdir}",
                f"-c listen_addresses={self.host}",
                *(f"-c {s}" for s in _FAST_SETTINGS),
            ]
        )
        command = [
            str(bindir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            str(max(1, int(deadline - time.monotonic()))),
            "start",
        ]
        proc = self._run(command, max(1.0, deadline - time.monotonic()) + 5, check=False)
        pid = self._read_pid()
        if proc.returncode != 0:
            if pid is not None:  # started but not ready in time: do not leave it behind
                self.pid = pid
                self.stop()
            return False
        if pid is None:
            raise PostgresError(f"postgres started but wrote no postmaster.pid\n{self.log_tail()}")
        self.pid = pid
        track_pid(pid)
        return True

    def _read_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, PermissionError):
            return None
        return int(first) if first.strip().isdigit() else None

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, close sessions) by PID, SIGKILL
        after ``timeout``. SIGTERM would be a smart shutdown, waiting for every client."""
        pid = self.pid
        if pid is None:
            return
        if _signal(pid, signal.SIGINT) and not _wait_gone(pid, timeout):
            _signal(pid, signal.SIGKILL)
            if not _wait_gone(pid, KILL_GRACE):
                raise PostgresError(f"postgres pid {pid} survived SIGKILL for {KILL_GRACE} s")
        untrack_pid(pid)
        self.pid = None

    def close(self) -> None:
        """Stop and remove the cluster if this instance created its directory."""
        self.stop()
        if self._owned_dir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        if self.pid is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- databases --------------------------------------------------------

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its DSN."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (FileNotFoundError, PermissionError):
            return ""

    # -- running as the postgres user -----------------------------------------

    @staticmethod
    def _as_service_user() -> bool:
        return os.geteuid() == 0

    def _chown(self, path: Path) -> None:
        if self._as_service_user():
            user = pwd.getpwnam(SERVICE_USER)
            os.chown(path, user.pw_uid, user.pw_gid)
            path.chmod(0o700)

    def _run(
        self, command: list[str], timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if self._as_service_user():
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
        if check and proc.returncode != 0:
            raise PostgresError(
                f"{Path(command[-1] if command else '?').name} failed ({proc.returncode}): "
                f"{' '.join(command)}\n{proc.stdout}{proc.stderr}"
            )
        return proc


__all__ = ["Postgres", "PostgresError", "find_bindir"]
