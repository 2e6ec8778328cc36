"""The master's loop, signal dispatch, reload and systemd notifications, with fake fork/waitpid/kill
(no child is ever forked, no broker)."""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from routemqd import daemon
from routemqd.exitcodes import ExitCode
from routemqd.manifest import SupervisorConfig, load
from routemqd.master import Master
from routemqd.procs import ProcessTable, describe_status, is_boot_failure
from routemqd.readiness import Readiness
from routemqd.slots import State
from tests.unit.fakes import Clock, exited


class FakeOs:
    """fork() hands out PIDs that are not ours, waitpid() reports what a test queued."""

    def __init__(self) -> None:
        self.next_pid = 4_000_000
        self.exits: list[tuple[int, int]] = []
        self.kills: list[tuple[int, int]] = []
        self.fork_error: OSError | None = None
        self.reap_all = False
        self.forked: list[int] = []

    def fork(self) -> int:
        if self.fork_error is not None:
            raise self.fork_error
        self.next_pid += 1
        self.forked.append(self.next_pid)
        return self.next_pid

    def waitpid(self, pid: int, flags: int) -> tuple[int, int]:
        if self.reap_all:
            self.exits += [(p, 0) for p in self.forked]
            self.forked = []
        if self.exits:
            return self.exits.pop(0)
        return 0, 0

    def kill(self, pid: int, sig: int) -> None:
        self.kills.append((pid, sig))


class FakeNotifier:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *a: self.sent.append((name, a))

    def names(self) -> list[str]:
        return [n for n, _ in self.sent]


def write_manifest(path: Path, **route: Any) -> Path:
    doc = {
        "routes": [{"name": "r", "topic": "r/{n}", "handler": "m:f", **route}],
        "supervisor": {"health_interval": 0.2, "graceful_timeout": 5},
        "control": {"socket": str(path.parent / "c.sock")},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def master(tmp_path: Path) -> Any:
    clock = Clock()
    ops = FakeOs()
    m = Master(load(str(write_manifest(tmp_path / "m.yaml"))), clock=clock, ops=ops)
    m.notifier = m.readiness.notifier = FakeNotifier()
    m.sel.register(m._sig_r, selectors.EVENT_READ, "signals")
    m.ops, m.fake_clock = ops, clock
    yield m
    m.sel.close()


def send(master: Any, sig: int) -> None:
    os.write(master._sig_w, bytes([sig]))
    for key, _ in master.sel.select(0):
        master._dispatch(key)


def test_a_pass_starts_every_slot_and_tells_systemd_once_ready(master: Any) -> None:
    master.table.add(next(iter(_specs(master))), master.clock())
    assert not master.manage(master.clock())
    slot = master.slots[("r", 0)]
    assert slot.state is State.STARTING and slot.proc.pid == master.ops.forked[0]
    assert "ready" not in master.notifier.names()
    master.table.on_event(slot.proc, {"t": "ready"}, master.clock())
    master.manage(master.clock())
    assert master.notifier.names().count("ready") == 1
    assert master.status_summary() == "1/1 workers ready, 0 failed"
    snap = master.snapshot()
    assert snap["daemon"]["ready"] == 1 and snap["slots"][0]["state"] == "ready"


def test_sighup_queues_a_reload_that_the_next_pass_applies(master: Any, tmp_path: Path) -> None:
    master.table.add(next(iter(_specs(master))), master.clock())
    master.manage(master.clock())
    write_manifest(tmp_path / "m.yaml", handler="m:g")
    send(master, signal.SIGHUP)
    assert master.reload_requested
    master.manage(master.clock())
    assert not master.reload_requested
    assert master.last_reload["ok"] and master.last_reload["summary"]
    assert "reloading" in master.notifier.names()
    assert master.slots[("r", 0)].replace_reason == "manifest changed"


def test_a_bad_reload_changes_nothing(master: Any, tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("routes: [")
    master.reload()
    assert not master.last_reload["ok"]
    assert master.status_summary().endswith("last reload failed")
    assert master.notifier.names()[-2:] == ["reloading", "ready"]


def test_reload_is_refused_while_stopping(master: Any) -> None:
    send(master, signal.SIGTERM)
    assert master.shutting_down
    before = list(master.notifier.names())
    with capture_logs() as logs:
        master.reload()
    assert master.notifier.names() == before  # no RELOADING=1 after STOPPING=1
    assert [e["event"] for e in logs] == ["reload_refused"]
    assert "stopping" in before


def test_sigterm_stops_workers_and_the_loop_ends_when_they_are_reaped(master: Any) -> None:
    master.table.add(next(iter(_specs(master))), master.clock())
    os.write(master._sig_w, bytes([signal.SIGTERM]))
    master.ops.reap_all = True
    with capture_logs() as logs:
        assert master.run() == int(ExitCode.OK)
    events = [e["event"] for e in logs]
    assert "shutdown_started" in events and events[-1] == "master_stopped"
    assert "worker_exited" in events


def test_a_second_stop_request_hurries(master: Any) -> None:
    master.table.add(next(iter(_specs(master))), master.clock())
    master.manage(master.clock())
    master.begin_shutdown("SIGTERM")
    (proc,) = master.procs
    assert proc.stop_deadline == master.clock() + 5
    master.begin_shutdown("SIGTERM")
    assert proc.stop_deadline == master.clock() + 1.0


def test_sigquit_kills_every_worker(master: Any) -> None:
    master.table.add(next(iter(_specs(master))), master.clock())
    master.manage(master.clock())
    (proc,) = master.procs
    send(master, signal.SIGQUIT)
    assert proc.killed and master.shutting_down


def test_sigusr1_reopens_logs_and_tells_the_workers(master: Any) -> None:
    with capture_logs() as logs:
        send(master, signal.SIGUSR1)
        send(master, signal.SIGCHLD)
    assert [e["event"] for e in logs] == ["log_reopened"]


def test_restart_routes_rejects_unknown_routes(master: Any) -> None:
    with pytest.raises(KeyError, match="nope"):
        master.restart_routes(["nope"])
    assert master.restart_routes(None) == ["r"]


def test_reaping_feeds_the_slot_table(master: Any) -> None:
    master.table.add(next(iter(_specs(master))), master.clock())
    master.manage(master.clock())
    (proc,) = master.procs
    master.ops.exits.append((proc.pid, exited(1)))
    master.reap()
    assert master.slots[("r", 0)].restarts == 1
    assert not master.procs


def test_the_loop_wakes_for_the_next_timer(master: Any) -> None:
    assert master._next_timeout(master.clock()) == 0.0  # the first health check is due
    master.next_health = master.clock() + 0.3
    assert master._next_timeout(master.clock()) == pytest.approx(0.3)


# ----------------------------------------------------------------------- process table


def test_fork_failure_is_logged_and_nothing_leaks(master: Any) -> None:
    master.ops.fork_error = OSError(errno.EAGAIN, "no more processes")
    fds_before = len(os.listdir("/proc/self/fd"))
    with capture_logs() as logs:
        assert master.procs.spawn(next(iter(_specs(master))), False, {}) is None
    assert [e["event"] for e in logs] == ["fork_failed"]
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_an_unknown_child_is_reaped_and_logged(master: Any) -> None:
    master.ops.exits.append((12345, exited(3)))
    with capture_logs() as logs:
        assert master.procs.reap() == []
    assert logs[0]["event"] == "unknown_child_reaped"
    assert logs[0]["status"] == "handler_import_failed"


def test_a_pid_we_cannot_verify_is_never_signalled(master: Any) -> None:
    proc = master.procs.spawn(next(iter(_specs(master))), False, {})
    assert proc is not None and proc.ps is None
    master.procs.signal(proc, signal.SIGTERM)
    assert master.ops.kills == []
    events = master.procs.read(proc)  # the child never ran: EOF closes the pipes
    assert events == [] and proc.command_fd == -1
    assert not master.procs.command(proc, "stop")


def test_a_reap_never_reads_a_pipe_whose_number_a_new_worker_got(
    master: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dies: its pipe reaches EOF and is closed, but waitpid() does not report it yet. B is
    forked meanwhile and gets A's descriptor number. Reaping A must leave B's READY to B."""
    writers: list[int] = []
    real_pipe = os.pipe

    def pipe() -> tuple[int, int]:  # keep a write end, as the forked child would
        r, w = real_pipe()
        writers.append(os.dup(w))
        return r, w

    monkeypatch.setattr(os, "pipe", pipe)
    spec = _specs(master)[0]
    try:
        a = master.procs.spawn(spec, False, {})
        a_status_fd, a_status_w = a.status_fd, writers[0]
        os.close(a_status_w)  # A exits
        assert master.procs.read(a) == []
        b = master.procs.spawn(spec, False, {})
        assert b.status_fd == a_status_fd  # the kernel hands out the lowest free number
        b_status_w = writers[2]
        os.write(b_status_w, b'{"t": "ready"}\n')
        master.ops.exits.append((a.pid, 9))
        assert master.procs.reap() == [(a, 9, [])]
        assert master.procs.by_fd[b.status_fd] is b
        assert master.procs.read(b) == [{"t": "ready"}]
    finally:
        for fd in writers:
            with contextlib.suppress(OSError):
                os.close(fd)


def test_process_table_len_and_iteration() -> None:
    table = ProcessTable(selectors.DefaultSelector(), lambda *a: 0, Clock(), FakeOs())
    assert len(table) == 0 and list(table) == []


def test_wait_statuses_are_named() -> None:
    assert describe_status(9) == "killed by SIGKILL"
    assert describe_status(exited(9)) == "exit 9"
    assert describe_status(exited(4)) == "handler_invalid"
    assert is_boot_failure(3) and not is_boot_failure(9) and not is_boot_failure(1)


# ---------------------------------------------------------------------------- readiness


def test_ready_is_sent_once_then_status_on_change_and_after_each_reload() -> None:
    n = FakeNotifier()
    r = Readiness(n, 10.0, started=0.0)  # type: ignore[arg-type]
    r.update(1.0, 0, 1, 0, True, False)
    assert n.names() == ["status", "watchdog"]
    r.update(2.0, 1, 1, 0, True, False)
    assert n.names()[-1] == "ready"
    r.update(3.0, 1, 1, 0, True, False)
    assert n.names().count("ready") == 1
    r.reload_applied(4.0)
    r.update(4.0, 1, 1, 0, True, True)  # still replacing
    assert n.names().count("ready") == 1
    r.update(5.0, 1, 1, 0, True, False)
    assert n.names().count("ready") == 2
    r.update(12.0, 1, 1, 0, True, False)
    assert n.names().count("watchdog") == 2
    assert r.next_wake() == [22.0]


def test_ready_is_sent_after_the_startup_timeout_even_without_a_broker() -> None:
    n = FakeNotifier()
    timeout = SupervisorConfig().ready_timeout
    r = Readiness(n, None, started=0.0)  # type: ignore[arg-type]
    r.update(timeout + 1, 0, 1, 0, True, False)
    assert n.names() == ["ready"] and r.next_wake() == []


def test_the_ready_timeout_is_the_manifests_and_status_says_what_workers_wait_for() -> None:
    n = FakeNotifier()
    r = Readiness(n, None, started=0.0, ready_timeout=5.0)  # type: ignore[arg-type]
    waiting = "broker 127.0.0.1:1 unreachable: [Errno 111] Connection refused"
    r.update(4.0, 0, 2, 0, True, False, waiting)
    assert n.names() == ["status"]
    assert n.sent[-1][1][0].endswith("; " + waiting)
    r.update(5.5, 0, 2, 0, True, False, waiting)
    assert n.names() == ["status", "ready"]
    r.update(6.0, 2, 2, 0, True, False, "")
    assert n.sent[-1][1][0] == "2/2 workers ready, 0 failed"


# ------------------------------------------------------------------------------- daemon


def test_run_and_retire_host_refuse_a_bad_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [")
    assert daemon.run_master(str(bad)) == int(ExitCode.CONFIG)
    assert daemon.retire_host(str(bad), "h") == int(ExitCode.CONFIG)
    assert "bad.yaml" in capsys.readouterr().err


def test_the_master_side_never_imports_paho_or_the_worker() -> None:
    code = (
        "import sys, routemqd.daemon, routemqd.metrics, routemqd.control, routemqd.cli\n"
        "bad = [m for m in sys.modules if m.startswith('paho') or m == 'routemqd.worker']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _specs(master: Any) -> list[Any]:
    from routemqd.plan import slots_for

    return list(slots_for(master.manifest).values())
