"""PidFile: atomic write, removal on release, stale files replaced, a live daemon refused."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from routemqd import pidfile as pidfile_mod
from routemqd.pidfile import PidFile, PidFileError


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not routemqd."""
    p = subprocess.Popen(["sleep", "60"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def fake_routemqd() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line says routemqd."""
    p = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "routemqd", "run"],
        stdin=subprocess.DEVNULL,
    )
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_acquire_writes_our_pid_and_release_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "routemqd.pid"
    pf = PidFile(str(path))
    pf.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    assert pf.read() == os.getpid()
    assert sorted(p.name for p in path.parent.iterdir()) == ["routemqd.pid"]
    pf.release()
    assert not path.exists()
    pf.release()  # twice is harmless


def test_acquire_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final path only ever appears by rename(), complete."""
    path = tmp_path / "routemqd.pid"
    renames: list[tuple[str, str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        renames.append((str(src), str(dst), Path(src).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(pidfile_mod.os, "replace", spy)
    PidFile(str(path)).acquire()
    assert len(renames) == 1
    src, dst, content = renames[0]
    assert dst == str(path)
    assert os.path.dirname(src) == str(tmp_path)  # same file system: rename is atomic
    assert content == f"{os.getpid()}\n"
    assert not os.path.exists(src)


def test_stale_pidfile_of_a_dead_process_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "routemqd.pid"
    path.write_text(f"{dead_pid()}\n")
    pf = PidFile(str(path))
    pf.acquire()
    assert pf.read() == os.getpid()
    pf.release()


def test_pidfile_naming_a_reused_pid_is_replaced(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "routemqd.pid"
    path.write_text(f"{sleeper.pid}\n")
    pf = PidFile(str(path))
    pf.acquire()
    assert pf.read() == os.getpid()
    pf.release()


@pytest.mark.parametrize("content", ["", "garbage\n", "0\n", "\n"])
def test_unreadable_content_is_stale(tmp_path: Path, content: str) -> None:
    path = tmp_path / "routemqd.pid"
    path.write_text(content)
    pf = PidFile(str(path))
    assert pf.read() is None
    pf.acquire()
    assert pf.read() == os.getpid()
    pf.release()


def test_live_routemqd_is_refused(tmp_path: Path, fake_routemqd: subprocess.Popen[bytes]) -> None:
    path = tmp_path / "routemqd.pid"
    path.write_text(f"{fake_routemqd.pid}\n")
    pf = PidFile(str(path))
    with pytest.raises(PidFileError, match=f"already running as PID {fake_routemqd.pid}"):
        pf.acquire()
    assert path.read_text() == f"{fake_routemqd.pid}\n"
    pf.release()  # never acquired: must not remove the other daemon's file
    assert path.exists()


def test_release_leaves_a_file_someone_else_rewrote(tmp_path: Path) -> None:
    path = tmp_path / "routemqd.pid"
    pf = PidFile(str(path))
    pf.acquire()
    path.write_text("12345\n")
    pf.release()
    assert path.read_text() == "12345\n"
