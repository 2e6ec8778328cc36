"""The local control socket: ``routemqd status | reload | restart | stop`` talk to the master here.

One JSON request line, one JSON reply, then the connection closes: no sessions, no state, so the
master serves it from its single loop. Root, the daemon's own user and, where the socket's mode
admits it, members of the daemon's group may talk to it: the socket's mode says so, and on Linux
the peer's credentials (uid, and groups through ``SO_PEERGROUPS``) are checked as well, because a
socket created in a directory with looser permissions would otherwise be the only guard.

The group is admitted when the manifest says ``control.mode: "0660"``, or when it says nothing
and the socket's directory is closed to everyone else, as systemd's ``/run/routemqd`` (0750,
group routemqd) is: then the directory already admits only the group, and ``routemqd status``
works for its members as the README shows. Anywhere else the default is 0600, owner only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import socket
import stat
import struct
import sys
from typing import Any

from routemqd.exitcodes import ExitCode
from routemqd.manifest import DEFAULT_CONTROL_SOCKET, ControlConfig, ManifestError, load
from routemqd.poolview import render_pools
from routemqd.units import format_size

MAX_REQUEST = 64 * 1024
EX_UNAVAILABLE = int(ExitCode.UNAVAILABLE)
EX_NOPERM = int(ExitCode.NO_PERMISSION)
OWNER_ONLY = 0o600
OWNER_AND_GROUP = 0o660


def socket_mode(control: ControlConfig, path: str) -> int:
    """The control socket's mode: the manifest's if it gives one, else by the directory.

    Group access by default only where the directory already keeps others out: two guards
    (directory and socket) stay in place, and the group is the one the directory admits.
    A directory that does not exist yet is created 0750 by ControlServer, so it counts as closed.
    """
    if control.mode_given:
        return control.mode
    try:
        dir_mode = os.stat(os.path.dirname(path) or ".").st_mode
    except OSError:
        return OWNER_AND_GROUP
    return OWNER_ONLY if dir_mode & 0o007 else OWNER_AND_GROUP


class ControlServer:
    def __init__(self, path: str, mode: int, master: Any) -> None:
        self.path = path
        self.mode = mode
        self.master = master
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o750, exist_ok=True)
        if os.path.exists(path):
            if _answers(path):
                raise OSError(errno.EADDRINUSE, f"another routemqd answers on {path}")
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # stale, left by a daemon that was killed
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.uid = os.getuid()
        self.gid = os.getgid()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)

    def allowed(self, conn: socket.socket) -> bool:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return True  # not Linux: the socket's mode is the guard
        pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, self.uid):
            return True
        if not self.mode & 0o060:
            return False
        # group members usually have the group as a supplementary one (usermod -aG)
        return gid == self.gid or self.gid in _peer_groups(conn, pid)

    def accept(self, sel: Any = None) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(1.0)
            if not self.allowed(conn):
                _send(conn, {"ok": False, "error": "permission denied"})
                return
            try:
                request = _read_line(conn)
            except (OSError, ValueError) as e:
                with contextlib.suppress(OSError):
                    _send(conn, {"ok": False, "error": f"bad request: {e}"})
                return
            try:
                reply = self.handle(request)
            except Exception as e:
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            with contextlib.suppress(OSError):
                _send(conn, reply)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        m = self.master
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, **m.snapshot()}
        if cmd == "reload":
            if m.shutting_down:
                # systemd would read RELOADING=1 after STOPPING=1 as a daemon that changed its mind
                return {"ok": False, "error": "the daemon is stopping; reload refused"}
            if m._replacing():
                m.reload_requested = True
                return {
                    "ok": True,
                    "queued": True,
                    "message": "reload queued after the one running",
                }
            m.reload()
            return {"ok": bool(m.last_reload["ok"]), "last_reload": m.last_reload}
        if cmd == "restart":
            routes = request.get("routes") or None
            try:
                names = m.restart_routes(routes)
            except KeyError as e:
                return {"ok": False, "error": f"no such route: {e.args[0]}"}
            return {"ok": True, "routes": names}
        if cmd == "stop":
            m.begin_shutdown("control socket", "retire" if request.get("retire") else None)
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
MAX_PEER_GROUPS = 256  # getsockopt() takes at most 1024 bytes; more groups: /proc


def _peer_groups(conn: socket.socket, pid: int) -> set[int]:
    """The peer's supplementary groups, from the socket (SO_PEERGROUPS), else from /proc.

    The kernel's answer comes first: under systemd's ProtectProc=invisible the daemon cannot see
    other users' /proc/PID at all, so the /proc way would lock every group member out.
    """
    size = struct.calcsize("I")
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * MAX_PEER_GROUPS)
    except OSError:
        return _supplementary_groups(pid)
    count = len(raw) // size
    return set(struct.unpack(f"{count}I", raw[: count * size]))


def _supplementary_groups(pid: int) -> set[int]:
    """The supplementary groups of a peer process (Linux /proc); empty when unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _read_line(conn: socket.socket) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    request = json.loads(buf.split(b"\n", 1)[0] or b"{}")
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object")
    return request


def _send(conn: socket.socket, reply: dict[str, Any]) -> None:
    conn.sendall(json.dumps(reply, default=str).encode() + b"\n")


# ------------------------------------------------------------------------------------ client


def request(path: str, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    send_error: OSError | None = None
    buf = b""
    try:
        s.connect(path)
        try:
            s.sendall(json.dumps(payload).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError) as e:
            # The daemon may answer and close before reading (a refused peer): read the answer.
            send_error = e
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                # Closing with our request unread resets the connection after the reply.
                if not buf:
                    raise
                break
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    if send_error is not None and not buf:
        raise send_error
    return json.loads(buf or b"{}")


def socket_path_for(args: argparse.Namespace) -> tuple[str, str | None]:
    """The control socket to talk to, and why the default is used (the manifest is broken).

    A broken manifest is exactly when people ask for status: fall back to the default socket
    quietly, and mention the manifest only if that does not reach a daemon either (the daemon
    reports a failed reload's error itself).
    """
    if getattr(args, "socket", None):
        return args.socket, None
    try:
        return load(args.config).control.socket, None
    except ManifestError as e:
        return DEFAULT_CONTROL_SOCKET, f"{e}\nroutemqd: using {DEFAULT_CONTROL_SOCKET}"


def client_main(args: argparse.Namespace) -> int:
    path, fallback = socket_path_for(args)
    payload: dict[str, Any] = {"cmd": args.command}
    if args.command == "restart":
        payload["routes"] = args.routes
    if args.command == "stop" and args.retire:
        payload["retire"] = True
    try:
        reply = request(path, payload)
    except (OSError, ValueError) as e:
        if fallback is not None:
            sys.stderr.write(f"routemqd: {fallback}\n")
        return _unreachable(path, e)
    if args.command == "status":
        if args.json:
            sys.stdout.write(json.dumps(reply, indent=2, default=str) + "\n")
        elif reply.get("ok"):
            sys.stdout.write(render_status(reply))
        if reply.get("ok"):
            return 0
    if not reply.get("ok"):
        error = reply.get("error") or (reply.get("last_reload") or {}).get("error")
        sys.stderr.write(f"routemqd: {args.command} failed: {error}\n")
        return EX_NOPERM if error == "permission denied" else 1
    if args.command == "reload":
        if reply.get("queued"):
            sys.stdout.write("reload queued: a rolling replace is still in progress\n")
        else:
            summary = reply["last_reload"].get("summary") or {}
            parts = [f"{k} {', '.join(v)}" for k, v in summary.items() if v]
            sys.stdout.write("reloaded: " + ("; ".join(parts) or "nothing changed") + "\n")
    elif args.command == "restart":
        sys.stdout.write(f"rolling restart of {', '.join(reply['routes'])} started\n")
    elif args.command == "stop":
        how = "retiring every slot" if args.retire else "keeping sessions"
        sys.stdout.write(f"graceful stop started ({how})\n")
    return 0


def _unreachable(path: str, error: Exception) -> int:
    """Say why the daemon could not be asked, with the exit code that tells it apart."""
    if isinstance(error, FileNotFoundError):
        sys.stderr.write(f"routemqd: the daemon is not running (no control socket at {path})\n")
        return EX_UNAVAILABLE
    if isinstance(error, ConnectionRefusedError):
        sys.stderr.write(f"routemqd: the daemon is not running (nothing listens on {path})\n")
        return EX_UNAVAILABLE
    if isinstance(error, PermissionError):
        sys.stderr.write(
            f"routemqd: permission denied on {path} (run as the daemon's user, root, or a "
            "member of its group)\n"
        )
        return EX_NOPERM
    sys.stderr.write(f"routemqd: no answer on {path}: {error}\n")
    return EX_UNAVAILABLE


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def render_status(reply: dict[str, Any]) -> str:
    d = reply["daemon"]
    lines = [
        f"routemqd pid {d['pid']}, up {_age(d['uptime'])}, manifest {d['manifest']}, "
        f"host {d['host_id']}",
        f"workers {d['ready']}/{d['startable']} ready, {d['failed']} failed"
        + (", shutting down" if d["shutting_down"] else ""),
    ]
    lr = d.get("last_reload") or {}
    if lr.get("at"):
        when = datetime.datetime.fromtimestamp(lr["at"]).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"last reload {when}: " + ("ok" if lr.get("ok") else f"FAILED: {lr['error']}"))
        if lr.get("ok") and lr.get("restart_needed"):
            lines.append("needs a restart to apply: " + ", ".join(lr["restart_needed"]))
    elif not lr.get("ok", True):
        lines.append(f"last reload FAILED: {lr.get('error')}")
    pools = render_pools(reply.get("pools") or ())
    if pools:
        lines.append("")
        lines.extend(pools)
    header = (
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
    )
    rows = [header]
    for s in reply["slots"]:
        problem = "" if s["connected"] else s.get("broker_problem") or ""
        note = s.get("last_error") or problem or s.get("last_reason") or ""
        rows.append(
            (
                s["route"],
                str(s["index"]),
                s["state"] + ("*" if s.get("replacing") else ""),
                str(s["pid"] or "-"),
                "yes" if s["connected"] else "no",
                _age(s["uptime"]),
                str(s["restarts"]),
                format_size(s["rss"]) if s["rss"] else "-",
                f"{s['cpu']:.1f}" if s["cpu"] is not None else "-",
                str(s["handled"]),
                str(s["failed"]),
                s["client_id"],
                note[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append("")
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"
