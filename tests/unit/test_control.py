"""The control socket's rendering, request handling and client, without a running daemon."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routemqd import control
from routemqd.control import ControlServer, client_main, render_status


def sample_snapshot(**daemon: Any) -> dict[str, Any]:
    return {
        "ok": True,
        "daemon": {
            "pid": 4242,
            "uptime": 3725.4,
            "manifest": "/etc/routemq.yaml",
            "host_id": "edge-1",
            "shutting_down": False,
            "ready": 2,
            "startable": 3,
            "failed": 1,
            "last_reload": {"ok": True, "at": None, "error": None, "summary": None},
            **daemon,
        },
        "slots": [
            {
                "route": "sensor-data",
                "index": 0,
                "state": "ready",
                "pid": 101,
                "client_id": "routemq-edge-1-sensor-data-0-abc123",
                "connected": True,
                "uptime": 75.2,
                "restarts": 0,
                "last_reason": "",
                "rss": 50 * 1024 * 1024,
                "cpu": 3.25,
                "handled": 1200,
                "failed": 3,
                "last_error": "",
                "replacing": False,
            },
            {
                "route": "sensor-data",
                "index": 1,
                "state": "ready",
                "pid": 102,
                "client_id": "routemq-edge-1-sensor-data-1-abc123",
                "connected": False,
                "uptime": 12.0,
                "restarts": 1,
                "last_reason": "killed by SIGKILL",
                "rss": 40 * 1024 * 1024,
                "cpu": 0.0,
                "handled": 7,
                "failed": 0,
                "last_error": "",
                "replacing": True,
            },
            {
                "route": "device-events",
                "index": 0,
                "state": "failed",
                "pid": None,
                "client_id": "routemq-edge-1-device-events-0-def456",
                "connected": False,
                "uptime": None,
                "restarts": 4,
                "last_reason": "handler_import_failed",
                "rss": None,
                "cpu": None,
                "handled": 0,
                "failed": 0,
                "last_error": "",
                "replacing": False,
            },
        ],
    }


def rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ROUTE"))
    return [re.split(r"\s{2,}", line.strip()) for line in lines[start:] if line.strip()]


def test_render_status_header_and_rows() -> None:
    text = render_status(sample_snapshot())
    lines = text.splitlines()
    assert lines[0] == "routemqd pid 4242, up 1h02m, manifest /etc/routemq.yaml, host edge-1"
    assert lines[1] == "workers 2/3 ready, 1 failed"
    table = rows(text)
    assert table[0] == [
        "ROUTE",
        "SLOT",
        "STATE",
        "PID",
        "CONN",
        "UPTIME",
        "RESTARTS",
        "RSS",
        "CPU%",
        "HANDLED",
        "FAILED",
        "CLIENT ID",
        "LAST REASON / ERROR",
    ]
    assert table[1] == [
        "sensor-data",
        "0",
        "ready",
        "101",
        "yes",
        "1m15s",
        "0",
        "50.0MiB",
        "3.2",
        "1200",
        "3",
        "routemq-edge-1-sensor-data-0-abc123",
    ]
    assert table[2][2] == "ready*"  # being replaced
    assert table[2][-1] == "killed by SIGKILL"
    assert table[3][:9] == [
        "device-events",
        "0",
        "failed",
        "-",
        "no",
        "-",
        "4",
        "-",
        "-",
    ]
    assert table[3][-1] == "handler_import_failed"
    assert text.endswith("\n")


def test_render_status_columns_line_up() -> None:
    text = render_status(sample_snapshot())
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ROUTE"))
    header = lines[start]
    col = header.index("CLIENT ID")
    for line in lines[start + 1 :]:
        assert line[col:].startswith("routemq-edge-1-")


def test_render_status_prefers_the_last_error_and_truncates() -> None:
    snap = sample_snapshot()
    snap["slots"][0]["last_error"] = "ValueError: " + "x" * 200
    table = rows(render_status(snap))
    assert table[1][-1].startswith("ValueError: ")
    assert len(table[1][-1]) == 60


def test_render_status_shows_a_failed_reload() -> None:
    at = time.mktime((2024, 5, 6, 7, 8, 9, 0, 0, -1))
    snap = sample_snapshot(
        last_reload={"ok": False, "at": at, "error": "m.yaml:3: bogus: unknown key"},
        shutting_down=True,
    )
    text = render_status(snap)
    assert "workers 2/3 ready, 1 failed, shutting down" in text
    assert "last reload 2024-05-06 07:08:09: FAILED: m.yaml:3: bogus: unknown key" in text
    ok = render_status(sample_snapshot(last_reload={"ok": True, "at": at, "error": None}))
    assert "last reload 2024-05-06 07:08:09: ok" in ok
    # A replacement that failed after a good reload has no new timestamp but is still shown.
    late = render_status(
        sample_snapshot(last_reload={"ok": False, "at": None, "error": "route x: boom"})
    )
    assert "last reload FAILED: route x: boom" in late


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (7260, "2h01m")],
)
def test_age(seconds: float | None, text: str) -> None:
    assert control._age(seconds) == text


# ----------------------------------------------------------------------------- the server


class FakeMaster:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.last_reload: dict[str, Any] = {"ok": True, "at": None, "error": None}
        self.reload_requested = False
        self.replacing = False
        self.shutting_down = False

    def snapshot(self) -> dict[str, Any]:
        return {k: v for k, v in sample_snapshot().items() if k != "ok"}

    def _replacing(self) -> bool:
        return self.replacing

    def reload(self) -> None:
        self.calls.append("reload")
        self.last_reload = {"ok": False, "at": 1.0, "error": "bad manifest", "summary": None}

    def restart_routes(self, routes: list[str] | None) -> list[str]:
        self.calls.append(("restart", routes))
        if routes and "nope" in routes:
            raise KeyError("nope")
        return sorted(routes or ["a", "b"])

    def begin_shutdown(self, reason: str, mode: str | None = None) -> None:
        self.calls.append(("stop", reason))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ControlServer, FakeMaster]]:
    master = FakeMaster()
    path = tmp_path / "ctl" / "control.sock"
    srv = ControlServer(str(path), 0o600, master)
    stop = threading.Event()

    def serve() -> None:
        import select

        while not stop.is_set():
            r, _, _ = select.select([srv.fileno()], [], [], 0.05)
            if r:
                srv.accept()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv, master
    finally:
        stop.set()
        thread.join(5)
        srv.close()


def test_server_socket_mode_and_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    srv = ControlServer(str(path), 0o600, FakeMaster())
    try:
        assert (os.stat(path).st_mode & 0o777) == 0o600
        assert (os.stat(path.parent).st_mode & 0o777) == 0o750
    finally:
        srv.close()
    assert not path.exists()


def test_server_replaces_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    srv = ControlServer(str(path), 0o600, FakeMaster())
    try:
        with pytest.raises(OSError, match="another routemqd"):
            ControlServer(str(path), 0o600, FakeMaster())
    finally:
        srv.close()


def test_server_requests(server: tuple[ControlServer, FakeMaster]) -> None:
    srv, master = server
    status = control.request(srv.path, {"cmd": "status"})
    assert status["ok"] is True and status["daemon"]["pid"] == 4242
    reload = control.request(srv.path, {"cmd": "reload"})
    assert reload == {"ok": False, "last_reload": master.last_reload}
    master.replacing = True
    queued = control.request(srv.path, {"cmd": "reload"})
    assert queued["ok"] and queued["queued"] and master.reload_requested
    assert control.request(srv.path, {"cmd": "restart", "routes": ["b"]}) == {
        "ok": True,
        "routes": ["b"],
    }
    bad = control.request(srv.path, {"cmd": "restart", "routes": ["nope"]})
    assert bad == {"ok": False, "error": "no such route: nope"}
    assert control.request(srv.path, {"cmd": "frobnicate"})["ok"] is False
    assert control.request(srv.path, {"cmd": "stop"}) == {"ok": True}
    assert ("stop", "control socket") in master.calls


def test_server_rejects_garbage(server: tuple[ControlServer, FakeMaster]) -> None:
    srv, _ = server
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(srv.path)
    s.sendall(b"[1, 2]\n")
    reply = json.loads(s.makefile().readline())
    s.close()
    assert reply["ok"] is False and "bad request" in reply["error"]


class FakeConn:
    def __init__(self, uid: int, gid: int, groups: tuple[int, ...] = ()) -> None:
        self.creds = struct.pack("3i", 999, uid, gid)
        self.groups = struct.pack(f"{len(groups)}I", *groups)

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        if (level, option) == (socket.SOL_SOCKET, control.SO_PEERGROUPS):
            return self.groups
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_PEERCRED)
        return self.creds


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "allowed"),
    [
        (0o600, 1000, 1000, True),  # the daemon's own user
        (0o600, 0, 0, True),  # root
        (0o600, 2000, 1000, False),  # another user, even in the daemon's group
        (0o660, 2000, 1000, True),  # group access when the mode grants it
        (0o660, 2000, 3000, False),  # another user in another group
    ],
)
def test_peer_credentials(tmp_path: Path, mode: int, uid: int, gid: int, allowed: bool) -> None:
    srv = ControlServer(str(tmp_path / "c.sock"), mode, FakeMaster())
    try:
        srv.uid, srv.gid = 1000, 1000
        assert srv.allowed(FakeConn(uid, gid)) is allowed  # type: ignore[arg-type]
    finally:
        srv.close()


def test_peer_credentials_of_a_real_connection(tmp_path: Path) -> None:
    srv = ControlServer(str(tmp_path / "c.sock"), 0o600, FakeMaster())
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            assert srv.allowed(a)
    finally:
        srv.close()


# ------------------------------------------------------------------------------ the client


def args(command: str, socket_path: str, **kw: Any) -> argparse.Namespace:
    base = {
        "command": command,
        "socket": socket_path,
        "config": "/nonexistent",
        "json": False,
        "retire": False,
    }
    base["routes"] = kw.pop("routes", [])
    return argparse.Namespace(**{**base, **kw})


def test_client_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(args("status", str(tmp_path / "none.sock"))) == 69
    assert "not running" in capsys.readouterr().err


def test_client_status_and_errors(
    server: tuple[ControlServer, FakeMaster], capsys: pytest.CaptureFixture[str]
) -> None:
    srv, _ = server
    assert client_main(args("status", srv.path)) == 0
    assert "sensor-data" in capsys.readouterr().out
    assert client_main(args("status", srv.path, json=True)) == 0
    assert json.loads(capsys.readouterr().out)["daemon"]["host_id"] == "edge-1"
    assert client_main(args("reload", srv.path)) == 1
    assert "reload failed: bad manifest" in capsys.readouterr().err
    assert client_main(args("restart", srv.path, routes=["nope"])) == 1
    assert "no such route: nope" in capsys.readouterr().err
    assert client_main(args("restart", srv.path, routes=["b"])) == 0
    assert "rolling restart of b started" in capsys.readouterr().out


def test_client_status_reports_a_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that refuses us answers without a snapshot: say so instead of crashing."""
    monkeypatch.setattr(
        control, "request", lambda *_a, **_k: {"ok": False, "error": "permission denied"}
    )
    code = client_main(args("status", str(tmp_path / "x.sock")))
    out = capsys.readouterr()
    assert code == 77
    assert "permission denied" in out.err
    assert out.out == ""
    monkeypatch.setattr(
        control, "request", lambda *_a, **_k: {"ok": False, "error": "something else"}
    )
    assert client_main(args("status", str(tmp_path / "x.sock"))) == 1
    assert "something else" in capsys.readouterr().err


def test_status_fields_match_the_master_snapshot() -> None:
    """render_status reads only keys that the master's status view provides."""
    import inspect

    from routemqd import views

    for key in sample_snapshot()["slots"][0]:
        assert f'"{key}"' in inspect.getsource(views.slot_view), key
    for key in sample_snapshot()["daemon"]:
        assert f'"{key}"' in inspect.getsource(views.snapshot), key


class _GatedSocket(socket.socket):
    """A client socket that waits for the server to have closed before it sends (or reads)."""

    gate = threading.Event()
    wait_before = "send"

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self.wait_before == "send":
            self.gate.wait(5)
        super().sendall(data, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.gate.wait(5)
        return super().recv(bufsize, flags)


class _SocketModule:
    socket = _GatedSocket

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


@pytest.mark.parametrize("wait_before", ["send", "recv"])
def test_request_reads_a_reply_sent_before_the_request_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wait_before: str
) -> None:
    """The daemon refuses a peer by answering and closing without reading its request.

    ``send``: the client writes after that close (EPIPE); ``recv``: the request was queued unread
    when the daemon closed, which resets the connection right after the reply.
    """
    import select

    path = str(tmp_path / "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    gate = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        if wait_before == "recv":
            select.select([conn], [], [], 5)  # the request is queued, and stays unread
        conn.sendall(b'{"ok": false, "error": "permission denied"}\n')
        conn.close()
        gate.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setattr(_GatedSocket, "gate", gate)
    monkeypatch.setattr(_GatedSocket, "wait_before", wait_before)
    monkeypatch.setattr(control, "socket", _SocketModule())
    try:
        reply = control.request(path, {"cmd": "status"}, timeout=5)
    finally:
        thread.join(5)
        listener.close()
    assert reply == {"ok": False, "error": "permission denied"}


# ------------------------------------------------------------------- the socket's default mode


@pytest.mark.parametrize(
    ("dir_mode", "given", "expected"),
    [
        (0o750, None, 0o660),  # systemd's /run/routemqd: the group the directory admits
        (0o700, None, 0o660),
        (0o755, None, 0o600),  # others may reach the socket: owner only
        (0o777, None, 0o600),
        (0o750, 0o600, 0o600),  # what the manifest says wins
        (0o777, 0o660, 0o660),
    ],
)
def test_socket_mode_default_follows_the_directory(
    tmp_path: Path, dir_mode: int, given: int | None, expected: int
) -> None:
    from routemqd.manifest import loads

    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(dir_mode)
    sock = directory / "control.sock"
    mode_line = f"  mode: '0{given:o}'\n" if given is not None else ""
    manifest = loads(
        f"control:\n  socket: {sock}\n{mode_line}"
        "routes:\n  - {name: a, topic: a/b, handler: m:f}\n",
        str(tmp_path / "routemq.yaml"),
    )
    assert control.socket_mode(manifest.control, str(sock)) == expected


def test_socket_mode_for_a_directory_not_made_yet(tmp_path: Path) -> None:
    # ControlServer creates it 0750, so the group default applies
    from routemqd.manifest import ControlConfig

    path = str(tmp_path / "later" / "control.sock")
    assert control.socket_mode(ControlConfig(socket=path), path) == 0o660


def test_status_with_a_broken_manifest_is_quiet_when_the_default_socket_answers(
    server: tuple[ControlServer, FakeMaster],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed reload leaves a broken manifest: status must not repeat its error every time."""
    srv, _ = server
    broken = tmp_path / "routemq.yaml"
    broken.write_text("routes: [\n")
    monkeypatch.setattr(control, "DEFAULT_CONTROL_SOCKET", srv.path)
    assert client_main(args("status", "", config=str(broken))) == 0
    out = capsys.readouterr()
    assert "sensor-data" in out.out
    assert out.err == ""

    # when the default socket does not answer either, the manifest's error explains why
    monkeypatch.setattr(control, "DEFAULT_CONTROL_SOCKET", str(tmp_path / "none.sock"))
    assert client_main(args("status", "", config=str(broken))) == 69
    err = capsys.readouterr().err
    assert str(broken) in err
    assert "not running" in err


def test_render_status_names_settings_that_need_a_restart() -> None:
    lr = {"ok": True, "at": 1.0, "error": None, "summary": {}, "restart_needed": ["control.mode"]}
    text = render_status(sample_snapshot(last_reload=lr))
    assert "needs a restart to apply: control.mode" in text
    assert "needs a restart" not in render_status(sample_snapshot())


def test_group_membership_comes_from_the_socket_not_proc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ProtectProc=invisible the daemon cannot read a peer's /proc: SO_PEERGROUPS decides."""
    monkeypatch.setattr(control, "_supplementary_groups", lambda pid: pytest.fail("read /proc"))
    srv = ControlServer(str(tmp_path / "c.sock"), 0o660, FakeMaster())
    try:
        srv.uid, srv.gid = 1000, 1000
        assert srv.allowed(FakeConn(2000, 2000, groups=(5, 1000))) is True  # type: ignore[arg-type]
        assert srv.allowed(FakeConn(2000, 2000, groups=(5,))) is False  # type: ignore[arg-type]
    finally:
        srv.close()
