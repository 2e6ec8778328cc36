"""The PostgreSQL example's hooks and handler against a real server, driven the way a worker
drives them (load from the shipped manifest, run setup, build the chain, call, run teardown):
one row per reading id however often it is delivered, and a clear setup failure when the database
is not there. The broker-level proof under kills is tests/chaos/test_postgres_chaos.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from routemqd import context
from routemqd.exitcodes import ExitCode
from routemqd.handlers import load_handler
from routemqd.hooks import RouteHooks, load_route_hooks, run_setup, run_teardown
from routemqd.manifest import load
from routemqd.message import Message, PayloadError
from routemqd.middleware import build_chain
from routemqd.plan import slots_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "postgres_sink" / "routemq.yaml"


@pytest.fixture
def worker_parts(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any, RouteHooks, Any]]:
    manifest = load(EXAMPLE)
    spec = slots_for(manifest)[("readings", 0)]
    handler = load_handler(spec.route.handler, spec.python_path)
    hooks = load_route_hooks(spec.route, spec.python_path, handler.is_async)
    previous = context._current
    ctx = context.make_context(spec)
    chain = build_chain(handler.func, [m.func for m in hooks.middleware], handler.is_async)
    try:
        yield spec, ctx, hooks, chain
    finally:
        context.install(previous)
        sys.modules.pop("sink", None)


def reading(device: str, rid: Any, value: float = 1.0) -> Message:
    import json

    return Message(
        topic=f"sensors/{device}/readings",
        payload=json.dumps({"id": rid, "value": value}).encode(),
        qos=1,
        pattern=load(EXAMPLE).routes[0].topic,
    )


@pytest.fixture
def booted(
    worker_parts: tuple[Any, Any, RouteHooks, Any],
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Any, Any, RouteHooks, Any]:
    """The example's setup has run against a fresh database."""
    spec, ctx, hooks, _chain = worker_parts
    monkeypatch.setenv("ROUTEMQ_SINK_DSN", postgres_dsn)
    assert run_setup(hooks.setup, ctx, spec.route.setup_timeout) is None
    return worker_parts


def test_redelivered_readings_leave_one_row_each(
    booted: tuple[Any, Any, RouteHooks, Any], postgres_dsn: str
) -> None:
    spec, ctx, hooks, chain = booted
    conn = ctx.state.db
    for rid in ("r1", "r2", "r1", "r3", "r2", "r1"):  # redeliveries after lost acks
        chain(reading("dev7", rid, value=len(rid)))
    with pytest.raises(PayloadError, match="needs a text 'id'"):
        chain(reading("dev7", 42))
    with psycopg.connect(postgres_dsn) as check:
        rows = check.execute("SELECT id, device_id FROM readings ORDER BY id").fetchall()
    assert rows == [("r1", "dev7"), ("r2", "dev7"), ("r3", "dev7")]
    assert run_teardown(hooks.teardown, ctx, spec.route.teardown_timeout) is None
    assert conn.closed


def test_a_broken_connection_is_replaced_once(
    booted: tuple[Any, Any, RouteHooks, Any], postgres_dsn: str
) -> None:
    spec, ctx, hooks, chain = booted
    first = ctx.state.db
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first.info.backend_pid,))
    chain(reading("dev1", "after-terminate"))
    assert ctx.state.db is not first
    with psycopg.connect(postgres_dsn) as check:
        assert check.execute("SELECT count(*) FROM readings").fetchone() == (1,)
    run_teardown(hooks.teardown, ctx, spec.route.teardown_timeout)


def test_setup_without_a_database_is_a_setup_failure(
    worker_parts: tuple[Any, Any, RouteHooks, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, ctx, hooks, _chain = worker_parts
    from tests.support.broker import _pick_free_port

    port = _pick_free_port("127.0.0.1")  # nothing listens there
    monkeypatch.setenv("ROUTEMQ_SINK_DSN", f"host=127.0.0.1 port={port} dbname=x user=x")
    failure = run_setup(hooks.setup, ctx, spec.route.setup_timeout)
    assert failure is not None and failure.code is ExitCode.SETUP_FAILED
    assert "setup sink:setup raised OperationalError" in failure.reason
