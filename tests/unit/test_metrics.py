"""Prometheus rendering and the HTTP responses, on a fake master (no fork, no broker)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from routemqd.manifest import MetricsConfig
from routemqd.metrics import MetricsServer, render
from routemqd.poolview import PoolView
from routemqd.protocol import DURATION_BUCKETS

NB = len(DURATION_BUCKETS) + 1


def buckets(**at: int) -> list[int]:
    """Per-bucket (non-cumulative) counts as a worker heartbeat carries them: b0=3, inf=1."""
    out = [0] * NB
    for key, n in at.items():
        out[NB - 1 if key == "inf" else int(key[1:])] = n
    return out


def make_proc(
    ready: bool = True, stopping: bool = False, rss: int = 0, **stats: Any
) -> SimpleNamespace:
    return SimpleNamespace(
        ready_at=1.0 if ready else None,
        stop_mode="keep" if stopping else None,
        rss=rss,
        stats=stats,
    )


def make_slot(
    route: str,
    proc: SimpleNamespace | None,
    retiring: bool = False,
    restarts: dict[str, int] | None = None,
    base: dict[str, Any] | None = None,
    state: str = "starting",
) -> SimpleNamespace:
    return SimpleNamespace(
        spec=SimpleNamespace(route=SimpleNamespace(name=route)),
        proc=proc,
        state=state,
        retiring=retiring,
        restart_reasons=restarts or {},
        counters_base=base or {},
    )


class FakeMaster:
    def __init__(self, slots: list[SimpleNamespace], failed: int = 0) -> None:
        self.slots = {(s.spec.route.name, i): s for i, s in enumerate(slots)}
        self.last_reload: dict[str, Any] = {"ok": True}
        self.shutting_down = False
        self.failed = failed

    def counts(self) -> tuple[int, int, int]:
        ready = sum(
            1
            for s in self.slots.values()
            if s.proc is not None and s.proc.ready_at is not None and not s.retiring
        )
        startable = sum(1 for s in self.slots.values() if not s.retiring) - self.failed
        return ready, startable, self.failed

    def pool_views(self) -> list[PoolView]:
        """Fixed pools, each as big as its slots that stay (what the master reports for them)."""
        sizes: dict[str, int] = {}
        for s in self.slots.values():
            sizes[s.spec.route.name] = sizes.get(s.spec.route.name, 0) + (not s.retiring)
        return [PoolView(name, False, n, n, n, 0) for name, n in sizes.items()]


def sample_master() -> FakeMaster:
    return FakeMaster(
        [
            make_slot(
                "sensor-data",
                make_proc(
                    rss=100,
                    connected=True,
                    received=12,
                    handled=10,
                    failed=2,
                    dead_lettered=1,
                    dropped=0,
                    buckets=buckets(b0=6, b3=4, inf=2),
                    duration_sum=1.5,
                ),
                restarts={"crash": 2},
                base={
                    "received": 5,
                    "handled": 5,
                    "failed": 0,
                    "duration_sum": 0.25,
                    "buckets": buckets(b0=5),
                },
            ),
            make_slot(
                "sensor-data",
                make_proc(rss=50, connected=False, handled=1, received=1, buckets=buckets(b1=1)),
                restarts={"crash": 1, "memory": 1},
            ),
            make_slot("device-events", None, restarts={"boot_failure": 3}),
            make_slot("device-events", make_proc(stopping=True, handled=4), retiring=True),
        ]
    )


def parse(text: str) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, str]]:
    samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def get(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_render_parses_with_the_reference_parser() -> None:
    samples, types = parse(render(sample_master()))
    assert types["routemqd_messages"] == "counter"
    assert types["routemqd_messages_received"] == "counter"
    assert types["routemqd_handler_duration_seconds"] == "histogram"
    assert types["routemqd_worker_restarts"] == "counter"
    assert types["routemqd_workers_up"] == "gauge"
    assert get(samples, "routemqd_up") == 1
    assert get(samples, "routemqd_last_reload_ok") == 1


def test_counters_add_live_stats_to_banked_totals() -> None:
    samples, _ = parse(render(sample_master()))
    m = "routemqd_messages_total"
    assert get(samples, m, route="sensor-data", outcome="handled") == 16
    assert get(samples, m, route="sensor-data", outcome="failed") == 2
    assert get(samples, m, route="sensor-data", outcome="dead_lettered") == 1
    assert get(samples, m, route="sensor-data", outcome="dropped") == 0
    assert get(samples, m, route="device-events", outcome="handled") == 4
    assert get(samples, "routemqd_messages_received_total", route="sensor-data") == 18


def test_gauges() -> None:
    samples, _ = parse(render(sample_master()))
    assert get(samples, "routemqd_workers_desired", route="sensor-data") == 2
    assert get(samples, "routemqd_workers_up", route="sensor-data") == 2
    assert get(samples, "routemqd_workers_connected", route="sensor-data") == 1
    assert get(samples, "routemqd_worker_rss_bytes", route="sensor-data") == 150
    # one slot down, one retiring (neither desired nor up)
    assert get(samples, "routemqd_workers_desired", route="device-events") == 1
    assert get(samples, "routemqd_workers_up", route="device-events") == 0


def test_restart_counters_by_reason() -> None:
    samples, _ = parse(render(sample_master()))
    r = "routemqd_worker_restarts_total"
    assert get(samples, r, route="sensor-data", reason="crash") == 3
    assert get(samples, r, route="sensor-data", reason="memory") == 1
    assert get(samples, r, route="device-events", reason="boot_failure") == 3


def test_histogram_is_cumulative_and_counts_match() -> None:
    samples, _ = parse(render(sample_master()))
    series = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "routemqd_handler_duration_seconds_bucket"
        and dict(labels)["route"] == "sensor-data"
    )
    assert [le for le, _ in series] == [*DURATION_BUCKETS, float("inf")]
    counts = [v for _, v in series]
    assert counts == sorted(counts)
    # b0: 6 + 5 banked, b1: 1, b3: 4, +Inf: 2
    assert counts[0] == 11
    assert counts[1] == 12
    assert counts[3] == 16
    assert counts[-1] == 18
    assert get(samples, "routemqd_handler_duration_seconds_count", route="sensor-data") == 18
    assert get(samples, "routemqd_handler_duration_seconds_sum", route="sensor-data") == 1.75


def test_counters_survive_a_restart() -> None:
    """Banking a dead worker's last heartbeat keeps every series where it was."""
    stats = {"handled": 7, "received": 7, "buckets": buckets(b2=7), "duration_sum": 0.1}
    slot = make_slot("r", make_proc(**stats))
    master = FakeMaster([slot])
    before, _ = parse(render(master))
    slot.counters_base = {**stats, "buckets": list(stats["buckets"])}  # what the master banks
    slot.proc = None
    during, _ = parse(render(master))
    slot.proc = make_proc(handled=1, received=1, buckets=buckets(b0=1))
    after, _ = parse(render(master))
    for key, value in before.items():
        if key[0].startswith(("routemqd_messages", "routemqd_handler_duration_seconds")):
            assert during[key] >= value, key
            assert after[key] >= during[key], key
    assert get(after, "routemqd_messages_total", route="r", outcome="handled") == 8


def test_label_values_are_escaped() -> None:
    master = FakeMaster([make_slot('we"ird\\name', make_proc(handled=1))])
    samples, _ = parse(render(master))
    assert get(samples, "routemqd_messages_total", route='we"ird\\name', outcome="handled") == 1


def test_failed_reload_gauge() -> None:
    master = sample_master()
    master.last_reload = {"ok": False, "error": "boom"}
    samples, _ = parse(render(master))
    assert get(samples, "routemqd_last_reload_ok") == 0


def test_no_slots_still_renders() -> None:
    samples, _ = parse(render(FakeMaster([])))
    assert get(samples, "routemqd_up") == 1


# ----------------------------------------------------------------------------------- HTTP


def server_for(master: FakeMaster) -> MetricsServer:
    return MetricsServer(MetricsConfig(host="127.0.0.1", port=0), master)


@pytest.mark.parametrize(
    ("path", "status"),
    [("/metrics", "200 OK"), ("/metrics?name[]=x", "200 OK"), ("/", "404 Not Found")],
)
def test_respond_paths(path: str, status: str) -> None:
    srv = server_for(sample_master())
    try:
        assert srv.respond("GET", path)[0] == status
        assert srv.respond("POST", path)[0] == "405 Method Not Allowed"
    finally:
        srv.close()


def healthz(master: FakeMaster) -> tuple[str, bytes]:
    srv = server_for(master)
    try:
        status, _ctype, body = srv.respond("GET", "/healthz")
        return status, body
    finally:
        srv.close()


def test_healthz_ok_when_every_slot_is_ready() -> None:
    master = FakeMaster([make_slot("a", make_proc()), make_slot("a", make_proc())])
    status, body = healthz(master)
    assert status == "200 OK"
    assert body == b"2/2 workers ready, 0 failed\n"


def test_healthz_unavailable_while_starting() -> None:
    master = FakeMaster([make_slot("a", make_proc()), make_slot("a", make_proc(ready=False))])
    assert healthz(master)[0] == "503 Service Unavailable"


def test_healthz_unavailable_while_a_slot_is_failed() -> None:
    """A failed slot is not startable, so ready == startable: that must still be 503."""
    master = FakeMaster([make_slot("a", make_proc()), make_slot("b", None)], failed=1)
    status, body = healthz(master)
    assert status == "503 Service Unavailable"
    assert body == b"1/1 workers ready, 1 failed\n"


def test_healthz_unavailable_while_shutting_down() -> None:
    master = FakeMaster([make_slot("a", make_proc())])
    master.shutting_down = True
    assert healthz(master)[0] == "503 Service Unavailable"


@pytest.fixture
def live_server() -> Iterator[MetricsServer]:
    srv = server_for(sample_master())
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
        yield srv
    finally:
        stop.set()
        thread.join(5)
        srv.close()


def raw_get(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_http_round_trip(live_server: MetricsServer) -> None:
    reply = raw_get(live_server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert parse(body.decode())[0]
    assert raw_get(live_server.port, b"GET /x HTTP/1.0\n\n").startswith(b"HTTP/1.1 404")


def test_failed_slots_are_counted_per_route() -> None:
    master = FakeMaster(
        [
            make_slot("a", None, state="failed"),
            make_slot("a", None, state="backoff"),
            make_slot("b", None, state="failed", retiring=True),
        ]
    )
    text = render(master)
    assert 'routemqd_workers_failed{route="a"} 1' in text
    assert 'routemqd_workers_failed{route="b"} 0' in text
