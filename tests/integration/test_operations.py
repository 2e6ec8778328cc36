"""Operating a live daemon: sd_notify, the control socket and CLI, metrics, pidfile, log reopen.

Every test runs a real mosquitto and a real ``routemqd run``; every process is stopped by PID.
Waits are bounded and generous, and nothing asserts on speed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import manifests
from tests.support.broker import Broker
from tests.support.daemon import Daemon
from tests.support.traffic import Publisher

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
STATUS_LINE = re.compile(r"^(\d+)/(\d+) workers ready, (\d+) failed")
SLOT_FIELDS = {
    "route",
    "index",
    "state",
    "pid",
    "client_id",
    "connected",
    "uptime",
    "restarts",
    "last_reason",
    "rss",
    "cpu",
    "handled",
    "failed",
}

DaemonFactory = Callable[..., Daemon]


# --------------------------------------------------------------------------------- helpers


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def cli(
    *args: str, timeout: float = 60, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``routemqd`` command line, optionally as another user (root only)."""
    command = [sys.executable, "-m", "routemqd", *args]
    if user is not None:
        command = [*as_user(user), *command]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/" if user else REPO_ROOT,
        env={**os.environ, "ROUTEMQD_CONFIG": "/nonexistent/routemq.yaml"},
        check=False,
    )


def as_user(user: str) -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--reuid", user, "--regid", "nogroup", "--clear-groups"]
    runuser = shutil.which("runuser")
    assert runuser is not None
    return [runuser, "-u", user, "--"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Parse /metrics with the reference parser: (samples, family name -> type)."""
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(body):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def slot_of(status: dict[str, Any], route: str, index: int = 0) -> dict[str, Any]:
    for s in status["slots"]:
        if s["route"] == route and s["index"] == index:
            return s
    raise KeyError((route, index))


def table_rows(text: str) -> list[dict[str, str]]:
    """Parse the ``routemqd status`` table into dicts keyed by column header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ROUTE"))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        cells = re.split(r"\s{2,}", line.strip())
        rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=True)))
    return rows


def row_of(rows: list[dict[str, str]], route: str, index: int = 0) -> dict[str, str]:
    for r in rows:
        if r["ROUTE"] == route and r["SLOT"] == str(index):
            return r
    raise KeyError((route, index))


def publish(broker: Broker, topic_for: Callable[[int], str], n: int) -> None:
    pub = Publisher(*broker.address, topic_for=topic_for, qos=1)
    try:
        pub.publish_many(n)
        pub.wait_acked(30)
    finally:
        pub.close()


def write_manifest(path: Path, broker: Broker, routes: list[dict[str, Any]], **top: Any) -> Path:
    return manifests.write(path, broker.port, routes, **top)


class NotifyListener:
    """Stands in for systemd: a datagram socket that records what arrives and who sent it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[int | None, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds_size = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(creds_size)
                )
            except TimeoutError:
                continue
            except OSError:
                return
            pid = None
            for level, kind, cdata in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:creds_size])[0]
            fields: dict[str, str] = {}
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                fields[key] = value
            with self._lock:
                self.messages.append((pid, fields))

    def snapshot(self) -> list[tuple[int | None, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def wait_for(
        self, predicate: Callable[[list[dict[str, str]]], bool], timeout: float, what: str
    ) -> list[dict[str, str]]:
        def check() -> list[dict[str, str]] | None:
            msgs = [m for _, m in self.snapshot()]
            return msgs if predicate(msgs) else None

        try:
            return wait_until(check, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; received: {self.snapshot()}") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def index_of(msgs: list[dict[str, str]], key: str, start: int = 0) -> int:
    for i in range(start, len(msgs)):
        if key in msgs[i]:
            return i
    raise AssertionError(f"no {key} after datagram {start}: {msgs}")


# ----------------------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the daemon's NOTIFY_SOCKET points: a datagram socket the test plays systemd on."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 108:
        pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return path


def test_sd_notify_lifecycle(
    broker: Broker,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    notify_path: Path,
) -> None:
    manifest = write_manifest(
        tmp_path / "routemq.yaml", broker, [manifests.route("notes", "notify/notes/+")]
    )
    listener = NotifyListener(notify_path)
    try:
        d = daemon_factory(
            manifest,
            env={
                "NOTIFY_SOCKET": str(notify_path),
                "WATCHDOG_USEC": "1000000",
                "ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger"),
            },
        )
        msgs = listener.wait_for(lambda ms: any("READY" in m for m in ms), 60, "READY=1")
        first_ready = msgs[index_of(msgs, "READY")]
        assert first_ready["READY"] == "1"
        assert STATUS_LINE.match(first_ready.get("STATUS", "")), first_ready
        d.wait_ready()
        worker_pids = {s["pid"] for s in d.status()["slots"]}

        write_manifest(
            manifest,
            broker,
            [
                manifests.route("notes", "notify/notes/+"),
                manifests.route("extra", "notify/extra/+"),
            ],
        )
        before_reload = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d.reload()

        def reloaded(ms: list[dict[str, str]]) -> bool:
            r = next((i for i, m in enumerate(ms) if "RELOADING" in m), None)
            return r is not None and any("READY" in m for m in ms[r:])

        listener.wait_for(reloaded, 30, "RELOADING=1 then READY=1")
        d.wait_ready()
        worker_pids |= {s["pid"] for s in d.status()["slots"]}
        listener.wait_for(
            lambda ms: any(
                m.get("STATUS", "").startswith("2/2 workers ready, 0 failed") for m in ms
            ),
            30,
            "STATUS 2/2 workers ready",
        )
        listener.wait_for(
            lambda ms: sum("WATCHDOG" in m for m in ms) >= 2, 30, "two WATCHDOG=1 pings"
        )
        assert d.stop() == 0
        msgs = listener.wait_for(lambda ms: any("STOPPING" in m for m in ms), 10, "STOPPING=1")
    finally:
        listener.close()

    ready = index_of(msgs, "READY")
    reloading = index_of(msgs, "RELOADING", ready + 1)
    ready_again = index_of(msgs, "READY", reloading + 1)
    stopping = index_of(msgs, "STOPPING", ready_again + 1)
    assert msgs[reloading]["RELOADING"] == "1"
    usec = int(msgs[reloading]["MONOTONIC_USEC"])
    assert before_reload <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    # READY=1 ends the reload for systemd, so it waits until the added worker is up.
    after_reload = STATUS_LINE.match(msgs[ready_again].get("STATUS", ""))
    assert after_reload is not None, msgs[ready_again]
    assert after_reload.groups() == ("2", "2", "0"), msgs[ready_again]
    assert all("READY" not in m and "RELOADING" not in m for m in msgs[stopping:])
    assert sum("WATCHDOG" in m for m in msgs[:stopping]) >= 2
    assert all(m["WATCHDOG"] == "1" for m in msgs if "WATCHDOG" in m)
    for m in msgs:
        if "STATUS" in m:
            assert STATUS_LINE.match(m["STATUS"]), m

    senders = {pid for pid, _ in listener.snapshot()}
    assert None not in senders, "the kernel attached no credentials"
    assert senders == {d.pid}, f"datagrams from {senders}; workers were {worker_pids}"


# ----------------------------------------------------------------- status and control CLI


def test_status_and_control_commands(
    broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    routes = [
        manifests.route("alpha", "ops/alpha/+", shared=True, workers=2),
        manifests.route("beta", "ops/beta/+"),
    ]
    manifest = write_manifest(tmp_path / "routemq.yaml", broker, routes)
    good_manifest = manifest.read_text()
    d = daemon_factory(manifest, env={"ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger")})
    d.wait_ready()
    publish(broker, lambda i: f"ops/beta/{i}", 3)
    d.wait_for(lambda s: slot_of(s, "beta")["handled"] == 3, 30, "3 handled by beta")

    r = cli("status", "--json", "--socket", d.socket)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert doc["daemon"]["pid"] == d.pid
    assert (doc["daemon"]["ready"], doc["daemon"]["startable"], doc["daemon"]["failed"]) == (
        3,
        3,
        0,
    )
    assert {(s["route"], s["index"]) for s in doc["slots"]} == {
        ("alpha", 0),
        ("alpha", 1),
        ("beta", 0),
    }
    for s in doc["slots"]:
        assert s.keys() >= SLOT_FIELDS, s
        assert s["state"] == "ready"
        assert s["connected"] is True
        assert isinstance(s["pid"], int)
        assert s["client_id"].startswith("routemq-testhost-" + s["route"])
        assert s["uptime"] >= 0
        assert s["restarts"] == 0
        assert s["rss"] is None or s["rss"] >= 0
        assert s["cpu"] is None or s["cpu"] >= 0
    assert slot_of(doc, "beta")["handled"] == 3
    assert slot_of(doc, "beta")["failed"] == 0

    r = cli("status", "--socket", d.socket)
    assert r.returncode == 0, r.stderr
    assert f"routemqd pid {d.pid}" in r.stdout
    assert "workers 3/3 ready, 0 failed" in r.stdout
    rows = table_rows(r.stdout)
    assert len(rows) == 3
    for s in doc["slots"]:
        row = row_of(rows, s["route"], s["index"])
        assert row["STATE"] == "ready"
        assert row["PID"] == str(s["pid"])
        assert row["CONN"] == "yes"
        assert row["CLIENT ID"] == s["client_id"]
        assert row["RESTARTS"] == "0"
        assert re.fullmatch(r"\d+s", row["UPTIME"]), row
    assert row_of(rows, "beta")["HANDLED"] == "3"
    assert row_of(rows, "beta")["FAILED"] == "0"

    # A worker killed behind the master's back is restarted, and status says why.
    victim = slot_of(doc, "alpha", 1)["pid"]
    os.kill(victim, signal.SIGKILL)
    after = d.wait_for(
        lambda s: (
            slot_of(s, "alpha", 1)["restarts"] == 1
            and slot_of(s, "alpha", 1)["state"] == "ready"
            and slot_of(s, "alpha", 1)["pid"] not in (None, victim)
        ),
        30,
        "alpha[1] restarted",
    )
    assert "SIGKILL" in slot_of(after, "alpha", 1)["last_reason"]
    r = cli("status", "--json", "--socket", d.socket)
    assert "SIGKILL" in slot_of(json.loads(r.stdout), "alpha", 1)["last_reason"]
    r = cli("status", "--socket", d.socket)
    row = row_of(table_rows(r.stdout), "alpha", 1)
    assert row["RESTARTS"] == "1"
    assert "SIGKILL" in row["LAST REASON / ERROR"]

    # A failed reload changes nothing and is reported by reload and by both status forms.
    pids_before = d.pids()
    manifest.write_text(good_manifest + "bogus_key: 1\n")
    r = cli("reload", "--socket", d.socket)
    assert r.returncode != 0
    assert "reload failed" in r.stderr and "bogus_key" in r.stderr, r.stderr
    doc = json.loads(cli("status", "--json", "--socket", d.socket).stdout)
    last = doc["daemon"]["last_reload"]
    assert last["ok"] is False
    assert "bogus_key" in last["error"]
    assert d.pids() == pids_before
    text = cli("status", "--socket", d.socket).stdout
    assert "FAILED" in text and "bogus_key" in text, text

    manifest.write_text(good_manifest)
    r = cli("reload", "--socket", d.socket)
    assert r.returncode == 0, r.stderr
    assert "reloaded" in r.stdout
    assert json.loads(cli("status", "--json", "--socket", d.socket).stdout)["daemon"][
        "last_reload"
    ]["ok"]

    # Rolling restart of one route.
    beta_pid = slot_of(d.status(), "beta")["pid"]
    r = cli("restart", "beta", "--socket", d.socket)
    assert r.returncode == 0, r.stderr
    assert "beta" in r.stdout
    d.wait_for(
        lambda s: (
            slot_of(s, "beta")["pid"] != beta_pid
            and slot_of(s, "beta")["state"] == "ready"
            and not slot_of(s, "beta")["replacing"]
        ),
        30,
        "beta replaced",
    )
    assert slot_of(d.status(), "alpha", 0)["pid"] == pids_before[("alpha", 0)]

    r = cli("restart", "no-such-route", "--socket", d.socket)
    assert r.returncode != 0
    assert "no such route" in r.stderr and "no-such-route" in r.stderr, r.stderr

    r = cli("stop", "--socket", d.socket)
    assert r.returncode == 0, r.stderr
    assert d.proc.wait(60) == 0
    assert not os.path.exists(d.socket)

    r = cli("status", "--socket", d.socket)
    assert r.returncode == 69
    assert "not running" in r.stderr


def test_control_commands_without_a_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    for command in ("status", "reload", "stop"):
        r = cli(command, "--socket", str(missing))
        assert r.returncode == 69, (command, r.stderr)
        assert "not running" in r.stderr
    # A socket file left behind by a killed daemon: nothing listens.
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    r = cli("status", "--json", "--socket", str(stale))
    assert r.returncode == 69
    assert "not running" in r.stderr


def test_with_the_broker_down_ready_comes_after_ready_timeout_and_status_says_why(
    broker_factory: Callable[..., Broker],
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    notify_path: Path,
) -> None:
    port = free_port()  # nothing listens here until the broker starts below
    manifest = manifests.write(
        tmp_path / "routemq.yaml",
        port,
        [manifests.route("late", "late/+")],
        # long enough for the master's preload, the fork and the worker's first refused connect
        # on a loaded host; READY still comes from this fallback, since the broker starts later
        supervisor={"ready_timeout": "5s"},
    )
    where = f"broker 127.0.0.1:{port} unreachable"
    listener = NotifyListener(notify_path)
    try:
        d = daemon_factory(
            manifest,
            env={
                "NOTIFY_SOCKET": str(notify_path),
                "ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger"),
            },
        )
        msgs = listener.wait_for(lambda ms: any("READY" in m for m in ms), 30, "READY=1")
        ready = msgs[index_of(msgs, "READY")]
        assert ready["STATUS"].startswith(f"0/1 workers ready, 0 failed; {where}"), ready

        row = wait_until(
            lambda: next((s for s in d.status()["slots"] if s["broker_problem"]), None),
            30,
            "the slot row names the broker problem",
        )
        assert row["connected"] is False and where in row["broker_problem"]
        text = cli("status", "--socket", d.socket)
        assert text.returncode == 0 and where in text.stdout, text.stdout

        broker_factory(port=port)
        d.wait_ready()
        row = wait_until(
            lambda: next((s for s in d.status()["slots"] if s["connected"]), None),
            30,
            "the worker connected",
        )
        assert row["broker_problem"] == ""
        listener.wait_for(
            lambda ms: any(m.get("STATUS") == "1/1 workers ready, 0 failed" for m in ms),
            30,
            "STATUS 1/1 workers ready",
        )
        assert d.stop() == 0
        # read once the master has exited: READY=1 goes out before its log line is written
        assert [e for e in d.events("master_ready") if e.get("level") == "warning"]
    finally:
        listener.close()


# -------------------------------------------------------------------------------- metrics


def test_metrics_and_healthz(broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    port = free_port()
    routes = [manifests.route("meter", "metrics/meter/+")]
    manifest = write_manifest(
        tmp_path / "routemq.yaml", broker, routes, metrics={"listen": f"127.0.0.1:{port}"}
    )
    d = daemon_factory(manifest, env={"ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger")})
    d.wait_ready()

    status, body = http_get(port, "/healthz")
    assert status == 200, body
    assert http_get(port, "/nope")[0] == 404
    assert http_get(port, "/metrics?x=1")[0] == 200

    samples, types = scrape(port)
    assert types["routemqd_messages"] == "counter"
    assert types["routemqd_handler_duration_seconds"] == "histogram"
    assert sample(samples, "routemqd_workers_desired", route="meter") == 1
    assert sample(samples, "routemqd_workers_up", route="meter") == 1
    assert sample(samples, "routemqd_up") == 1

    n = 25
    publish(broker, lambda i: f"metrics/meter/{i}", n)

    def handled_now() -> float:
        value = sample(scrape(port)[0], "routemqd_messages_total", route="meter", outcome="handled")
        return value or 0.0

    wait_until(lambda: handled_now() == n, 30, f"{n} handled in /metrics")
    samples, _ = scrape(port)
    assert sample(samples, "routemqd_messages_received_total", route="meter") == n
    assert sample(samples, "routemqd_messages_total", route="meter", outcome="failed") == 0
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "routemqd_handler_duration_seconds_bucket" and dict(labels)["route"] == "meter"
    )
    counts = [value for _, value in buckets]
    assert buckets[-1][0] == float("inf")
    assert counts == sorted(counts), "histogram buckets must be cumulative"
    assert counts[-1] == n
    assert sample(samples, "routemqd_handler_duration_seconds_count", route="meter") == n
    assert (sample(samples, "routemqd_handler_duration_seconds_sum", route="meter") or 0) >= 0
    restarts_before = sum(
        v for (name, _), v in samples.items() if name == "routemqd_worker_restarts_total"
    )

    # SIGKILL the worker: restarts grow, counters never go backwards across the restart.
    victim = slot_of(d.status(), "meter")["pid"]
    os.kill(victim, signal.SIGKILL)
    seen: list[float] = []

    def restarted() -> bool:
        samples, _ = scrape(port)
        seen.append(
            sample(samples, "routemqd_messages_total", route="meter", outcome="handled") or 0
        )
        crash = sample(samples, "routemqd_worker_restarts_total", route="meter", reason="crash")
        up = sample(samples, "routemqd_workers_up", route="meter")
        return bool(crash and crash >= 1 and up == 1)

    wait_until(restarted, 30, "worker restart in /metrics")
    assert seen == sorted(seen) and seen[0] == n, seen
    samples, _ = scrape(port)
    restarts_after = sum(
        v for (name, _), v in samples.items() if name == "routemqd_worker_restarts_total"
    )
    assert restarts_after > restarts_before
    publish(broker, lambda i: f"metrics/meter/{1000 + i}", 5)
    wait_until(lambda: handled_now() == n + 5, 30, "handled keeps counting after a restart")
    samples, _ = scrape(port)
    assert sample(samples, "routemqd_handler_duration_seconds_count", route="meter") == n + 5

    # A route whose handler does not import: its slot fails, and /healthz says so.
    write_manifest(
        manifest,
        broker,
        [*routes, manifests.route("broken", "metrics/broken/+", "tests.handlers.no_such_mod:x")],
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    d.reload()
    d.wait_for(lambda s: slot_of(s, "broken")["state"] == "failed", 30, "broken slot failed")
    status, body = http_get(port, "/healthz")
    assert status == 503, body
    assert "1 failed" in body
    samples, _ = scrape(port)
    assert sample(samples, "routemqd_workers_desired", route="broken") == 1
    assert sample(samples, "routemqd_workers_up", route="broken") == 0
    assert sample(samples, "routemqd_workers_up", route="meter") == 1
    assert (
        sample(samples, "routemqd_worker_restarts_total", route="broken", reason="boot_failure")
        or 0
    ) >= 1

    # Dropping the broken route brings /healthz back.
    write_manifest(manifest, broker, routes, metrics={"listen": f"127.0.0.1:{port}"})
    d.reload()
    wait_until(lambda: http_get(port, "/healthz")[0] == 200, 30, "/healthz 200 again")
    assert d.stop() == 0


# -------------------------------------------------------------------------------- pidfile


def test_pidfile(broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pidfile = run_dir / "routemqd.pid"
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile.write_text(f"{gone.pid}\n")  # stale: that process is dead

    manifest = write_manifest(tmp_path / "routemq.yaml", broker, [manifests.route("p", "pid/+")])
    env = {"ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger")}
    d = daemon_factory(manifest, env=env, args=("--pidfile", str(pidfile)))
    d.wait_ready()
    assert pidfile.read_text() == f"{d.pid}\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["routemqd.pid"]

    second = daemon_factory(
        manifest, env=env, args=("--pidfile", str(pidfile), "--socket", str(tmp_path / "2.sock"))
    )
    assert second.proc.wait(60) == 73
    assert "already running" in second.log_tail()
    assert pidfile.read_text() == f"{d.pid}\n"
    assert d.proc.poll() is None

    assert d.stop() == 0
    assert not pidfile.exists()
    assert list(run_dir.iterdir()) == []


# ------------------------------------------------------------------------- log reopening


def test_sigusr1_reopens_the_log_file(
    broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    log_file = tmp_path / "routemqd.log"
    manifest = write_manifest(
        tmp_path / "routemq.yaml",
        broker,
        [manifests.route("logs", "logs/+")],
        logging={"file": str(log_file), "level": "info"},
    )
    d = daemon_factory(manifest, env={"ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger")})
    d.wait_ready()

    def events(path: Path) -> list[str]:
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line)["event"])
        return out

    assert "master_started" in events(log_file)
    rotated = tmp_path / "routemqd.log.1"
    log_file.rename(rotated)
    d.signal(signal.SIGUSR1)
    wait_until(lambda: "log_reopened" in events(log_file), 30, "log_reopened in the new file")
    assert d.control(cmd="reload")["ok"]
    wait_until(lambda: "reload_applied" in events(log_file), 30, "reload_applied in the new file")
    assert d.stop() == 0
    new_events = events(log_file)
    old_events = events(rotated)
    assert "master_started" not in new_events
    assert "master_stopped" in new_events
    assert "master_started" in old_events
    assert {"log_reopened", "reload_applied", "master_stopped"}.isdisjoint(old_events)


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def test_sigusr1_reopens_the_log_file_in_workers(
    broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    log_file = tmp_path / "routemqd.log"
    manifest = write_manifest(
        tmp_path / "routemq.yaml",
        broker,
        [manifests.route("wlogs", "wlogs/+")],
        logging={"file": str(log_file)},
    )
    d = daemon_factory(manifest, env={"ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger")})
    d.wait_ready()
    rotated = tmp_path / "routemqd.log.1"
    log_file.rename(rotated)
    d.signal(signal.SIGUSR1)
    # the worker's own line: the master's says it asked, the worker's that it reopened
    wait_until(
        lambda: any(
            e["event"] == "log_reopened" and e.get("pool") == "wlogs" for e in _events(log_file)
        ),
        30,
        "the worker's log_reopened in the new file",
    )
    pub = Publisher(
        *broker.address, topic_for=lambda i: "wlogs/x", payload_for=lambda i: f"{i}:raise"
    )
    try:
        pub.publish_many(1)
        pub.wait_acked(30)
    finally:
        pub.close()

    def handler_failed() -> list[Path]:
        return [
            p
            for p in (log_file, rotated)
            if any(e["event"] == "handler_failed" for e in _events(p))
        ]

    where = wait_until(handler_failed, 30, "handler_failed logged")
    assert where == [log_file], f"the worker still writes to {where}"


# ---------------------------------------------------------------------- socket permissions


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A 0755 directory outside pytest's 0700 tree, so another user can reach a socket in it."""
    path = Path(tempfile.mkdtemp(prefix="routemqd-ctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _other_user_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a client as another user"
    if not (shutil.which("setpriv") or shutil.which("runuser")):
        return "neither setpriv nor runuser is installed"
    try:
        import grp
        import pwd

        pwd.getpwnam("nobody")
        grp.getgrnam("nogroup")
    except KeyError:
        return "no user nobody / group nogroup"
    return None


def test_control_socket_refuses_other_users(
    broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path, open_dir: Path
) -> None:
    reason = _other_user_available()
    if reason:
        pytest.skip(reason)
    sock_path = open_dir / "control.sock"
    manifest = write_manifest(
        tmp_path / "routemq.yaml",
        broker,
        [manifests.route("perm", "perm/+")],
        control={"socket": str(sock_path)},
    )
    d = daemon_factory(manifest, env={"ROUTEMQD_TEST_LEDGER": str(tmp_path / "ledger")})
    d.wait_ready()
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600

    # The socket's mode keeps another user out.
    r = cli("status", "--socket", str(sock_path), user="nobody")
    assert r.returncode == 77, (r.stdout, r.stderr)
    assert "permission denied" in r.stderr
    assert "Traceback" not in r.stderr

    # With the mode opened up, the peer-credential check still refuses the connection.
    os.chmod(sock_path, 0o666)
    for command in ("status", "stop"):
        r = cli(command, "--socket", str(sock_path), user="nobody")
        assert r.returncode != 0, (command, r.stdout, r.stderr)
        assert "permission denied" in r.stderr, (command, r.stderr)
        assert "Traceback" not in r.stderr
    r = cli("status", "--json", "--socket", str(sock_path), user="nobody")
    assert r.returncode != 0
    assert json.loads(r.stdout) == {"ok": False, "error": "permission denied"}

    # The daemon ignored them and still answers its own user.
    assert d.proc.poll() is None
    assert d.status()["daemon"]["shutting_down"] is False
    assert d.stop() == 0
    assert not sock_path.exists()


# ------------------------------------------------------------------------ install-systemd

INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-systemd"


def run_install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_install_systemd_dry_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    r = run_install("--dry-run", env={"DESTDIR": str(root)})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"{root}/etc/systemd/system/routemqd.service" in out
    assert "/etc/systemd/system/routemqd.service" in out
    assert re.search(r"systemd-sysusers|useradd .*routemqd", out), out
    assert "user and group: routemqd" in out
    assert f"{root}/opt/routemqd" in out and "-m venv" in out
    assert f"ln -sfn /opt/routemqd/bin/routemqd {root}/usr/local/bin/routemqd" in out
    assert f"install -m 0640 -o root -g routemqd {REPO_ROOT}/etc/routemq.yaml" in out
    assert "daemon-reload" in out  # said why it is skipped
    assert "systemctl enable --now routemqd" in out
    assert "routemqd status" in out
    assert list(root.iterdir()) == [], "a dry run must not change anything"

    (root / "etc").mkdir()
    (root / "etc" / "routemq.yaml").write_text("mine\n")
    r = run_install("--dry-run", "--destdir", str(root))
    assert r.returncode == 0, r.stderr
    assert f"keeping the existing {root}/etc/routemq.yaml" in r.stdout
    assert "etc/routemq.yaml " not in r.stdout.replace("keeping the existing", "")

    r = run_install("--no-such-option")
    assert r.returncode == 2
    assert "unknown option" in r.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
[ "$1" = -m ] && [ "$2" = venv ] || exit 3
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\necho "$*" >> "%s/pip.log"\\n' "$3" > "$3/bin/pip"
chmod +x "$3/bin/pip"
"""


def test_install_systemd_into_a_staging_root(tmp_path: Path) -> None:
    """A real run under DESTDIR; python3 is replaced so no package index is needed."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    root = tmp_path / "root"
    r = run_install("--destdir", str(root), env={"PYTHON": str(fake)})
    assert r.returncode == 0, r.stdout + r.stderr

    unit = root / "etc/systemd/system/routemqd.service"
    assert unit.read_text() == (REPO_ROOT / "systemd/routemqd.service").read_text()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    link = root / "usr/local/bin/routemqd"
    assert os.readlink(link) == "/opt/routemqd/bin/routemqd"
    assert f"install --quiet {REPO_ROOT}" in (root / "opt/routemqd/pip.log").read_text()
    sysusers = root / "usr/lib/sysusers.d/routemqd.conf"
    assert sysusers.read_text() == (REPO_ROOT / "systemd/routemqd.sysusers").read_text()
    config = root / "etc/routemq.yaml"
    assert config.read_text() == (REPO_ROOT / "etc/routemq.yaml").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    if shutil.which("systemd-sysusers"):
        passwd = (root / "etc/passwd").read_text()
        group = (root / "etc/group").read_text()
        assert re.search(r"^routemqd:x:\d+:\d+:", passwd, re.M), passwd
        gid = int(re.search(r"^routemqd:x:(\d+):", group, re.M).group(1))  # type: ignore[union-attr]
        if os.geteuid() == 0:
            assert (config.stat().st_uid, config.stat().st_gid) == (0, gid)
    assert "no systemctl daemon-reload" in r.stdout

    config.write_text("edited: true\n")
    r = run_install("--destdir", str(root), env={"PYTHON": str(fake)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert config.read_text() == "edited: true\n"
    assert "keeping the existing" in r.stdout


def test_install_systemd_adds_the_broker_settings_to_a_local_mosquitto(tmp_path: Path) -> None:
    """With /etc/mosquitto/conf.d present the drop-in is installed once, never overwritten."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    shipped = (REPO_ROOT / "etc/mosquitto.d/routemqd.conf").read_text()

    bare = tmp_path / "bare"
    r = run_install("--destdir", str(bare), env={"PYTHON": str(fake)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (bare / "etc/mosquitto").exists()
    assert "etc/mosquitto.d/routemqd.conf" in r.stdout  # says where the settings are

    root = tmp_path / "root"
    (root / "etc/mosquitto/conf.d").mkdir(parents=True)
    r = run_install("--destdir", str(root), env={"PYTHON": str(fake)})
    assert r.returncode == 0, r.stdout + r.stderr
    dropin = root / "etc/mosquitto/conf.d/routemqd.conf"
    assert dropin.read_text() == shipped
    assert stat.S_IMODE(dropin.stat().st_mode) == 0o644
    assert "systemctl restart mosquitto" in r.stdout

    dropin.write_text("max_queued_messages 0\n")
    r = run_install("--destdir", str(root), env={"PYTHON": str(fake)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert dropin.read_text() == "max_queued_messages 0\n"
    assert f"keeping the existing {dropin}" in r.stdout


def test_mosquitto_dropin_has_the_settings_the_promise_needs() -> None:
    lines = (REPO_ROOT / "etc/mosquitto.d/routemqd.conf").read_text().splitlines()
    settings = dict(
        line.split(None, 1) for line in lines if line.strip() and not line.startswith("#")
    )
    assert settings["persistence"] == "true"
    assert int(settings["autosave_interval"]) <= 10
    assert settings["autosave_on_changes"] == "false"
    assert settings["max_queued_messages"] == "0"
    assert int(settings["memory_limit"]) > 0
    # a drop-in must not take over the listeners or the distribution's paths
    assert not {"listener", "port", "user", "persistence_location"} & settings.keys()
