"""Prometheus ``/metrics`` and a ``/healthz`` probe, served from the master's own loop.

No HTTP framework and no thread: the master stays single-threaded so ``fork()`` stays safe.
Requests are tiny GETs from a scraper on a trusted network; each is read and answered in one go
with a short timeout. Counters come from the worker heartbeats, banked per slot when a worker
exits so they never go backwards across restarts.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from routemqd.manifest import MetricsConfig
from routemqd.poolview import pool_metric_lines
from routemqd.protocol import DURATION_BUCKETS
from routemqd.slots import State
from routemqd.views import OUTCOMES, totals

MAX_REQUEST = 8192


class MetricsServer:
    def __init__(self, cfg: MetricsConfig, master: Any) -> None:
        self.master = master
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((cfg.host, cfg.port))
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(0.5)
            try:
                buf = b""
                while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < MAX_REQUEST:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                line = buf.split(b"\n", 1)[0].decode("latin-1").split()
                path = line[1] if len(line) >= 2 else "/"
                status, ctype, body = self.respond(line[0] if line else "", path)
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                conn.sendall(head.encode() + body)
            except OSError:
                pass

    def respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            return (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(self.master).encode(),
            )
        if path == "/livez":
            return "200 OK", "text/plain", b"the master loop is running\n"
        if path in ("/healthz", "/readyz"):
            ready, startable, failed = self.master.counts()
            # A slot parked in ``failed`` is not counted as startable, so check it on its own.
            ok = (
                startable > 0
                and ready >= startable
                and failed == 0
                and not self.master.shutting_down
            )
            text = f"{ready}/{startable} workers ready, {failed} failed\n".encode()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", text
        return "404 Not Found", "text/plain", b"try /metrics or /healthz\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(master: Any) -> str:
    """Prometheus text exposition format 0.0.4."""
    out: list[str] = []
    routes: dict[str, dict[str, Any]] = {}
    for slot in master.slots.values():
        name = slot.spec.route.name
        r = routes.setdefault(
            name,
            {
                "up": 0,
                "failed": 0,
                "connected": 0,
                "rss": 0,
                "restarts": {},
                "counts": {},
                "buckets": [0] * (len(DURATION_BUCKETS) + 1),
                "sum": 0.0,
            },
        )
        proc = slot.proc
        stats = proc.stats if proc is not None else {}
        if proc is None and not slot.retiring and slot.state == State.FAILED:
            r["failed"] += 1
        if proc is not None and proc.ready_at is not None and proc.stop_mode is None:
            r["up"] += 1
        if stats.get("connected"):
            r["connected"] += 1
        if proc is not None:
            r["rss"] += proc.rss
        for reason, n in slot.restart_reasons.items():
            r["restarts"][reason] = r["restarts"].get(reason, 0) + n
        total = totals(slot)
        for outcome in OUTCOMES:
            r["counts"][outcome] = r["counts"].get(outcome, 0) + total[outcome]
        r["received"] = r.get("received", 0) + total["received"]
        for i, c in enumerate(total["buckets"]):
            r["buckets"][i] += c
        r["sum"] += total["duration_sum"]

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("routemqd_messages_received_total", "counter", "Messages delivered to workers.")
    for name, r in routes.items():
        out.append(f'routemqd_messages_received_total{{route="{_esc(name)}"}} {r["received"]:.0f}')
    family("routemqd_messages_total", "counter", "Messages finished by handlers, by outcome.")
    for name, r in routes.items():
        for outcome, value in sorted(r["counts"].items()):
            out.append(
                f'routemqd_messages_total{{route="{_esc(name)}",outcome="{outcome}"}} {value:.0f}'
            )
    family("routemqd_handler_duration_seconds", "histogram", "Handler run time per message.")
    for name, r in routes.items():
        cumulative = 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), r["buckets"], strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(
                f'routemqd_handler_duration_seconds_bucket{{route="{_esc(name)}",le="{le}"}} '
                f"{cumulative}"
            )
        out.append(f'routemqd_handler_duration_seconds_sum{{route="{_esc(name)}"}} {r["sum"]:.6f}')
        out.append(f'routemqd_handler_duration_seconds_count{{route="{_esc(name)}"}} {cumulative}')
    family("routemqd_worker_restarts_total", "counter", "Worker restarts and replacements.")
    for name, r in routes.items():
        for reason, n in sorted(r["restarts"].items()):
            labels = f'route="{_esc(name)}",reason="{_esc(reason)}"'
            out.append(f"routemqd_worker_restarts_total{{{labels}}} {n}")
    for metric, key, help_text in (
        ("routemqd_workers_up", "up", "Workers subscribed and ready."),
        ("routemqd_workers_failed", "failed", "Slots parked in failed (crashed too often)."),
        ("routemqd_workers_connected", "connected", "Workers connected to the broker."),
        ("routemqd_worker_rss_bytes", "rss", "Resident memory of the route's workers."),
    ):
        family(metric, "gauge", help_text)
        for name, r in routes.items():
            out.append(f'{metric}{{route="{_esc(name)}"}} {r[key]}')
    # desired, min and max per pool: the scaler's target for an autoscaled pool (one family each)
    out.extend(pool_metric_lines(master.pool_views()))
    family("routemqd_up", "gauge", "1 while the master runs.")
    out.append("routemqd_up 1")
    with contextlib.suppress(Exception):
        lr = master.last_reload
        family("routemqd_last_reload_ok", "gauge", "1 if the last reload was applied.")
        out.append(f"routemqd_last_reload_ok {1 if lr.get('ok') else 0}")
    return "\n".join(out) + "\n"
