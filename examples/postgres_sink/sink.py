"""MQTT → PostgreSQL, exactly one row per reading however often a reading is delivered.

routemqd delivers QoS 1 at least once: a worker killed after the handler committed but before the
acknowledgement reached the broker gets the same message again in its replacement. The row is
keyed by an id the device puts in the payload, and the insert is ``ON CONFLICT DO NOTHING``, so
the second delivery finds the row and changes nothing. The commit happens before the handler
returns, and routemqd acknowledges only after the handler returned: a reading is either in the
table and acknowledged, in the table and about to be redelivered (a no-op), or not in the table
and about to be redelivered. Never acknowledged and missing.

Payload: ``{"id": "<unique reading id>", "value": 21.5}`` on ``sensors/<device_id>/readings``.
The connection string comes from ``ROUTEMQ_SINK_DSN`` (libpq syntax; a password belongs in
``~/.pgpass`` or ``PGPASSFILE``, not in the manifest or the environment of every process).
"""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg

from routemqd.context import WorkerContext
from routemqd.message import Message, PayloadError

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id          text PRIMARY KEY,
    device_id   text NOT NULL,
    value       double precision,
    received_at timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = """
INSERT INTO readings (id, device_id, value) VALUES (%s, %s, %s)
ON CONFLICT (id) DO NOTHING
"""
_SCHEMA_LOCK = 0x726F7574  # every worker runs setup at once: one creates the table at a time


def _connect() -> psycopg.Connection[Any]:
    return psycopg.connect(os.environ.get("ROUTEMQ_SINK_DSN", "dbname=routemq"), connect_timeout=10)


def setup(ctx: WorkerContext) -> None:
    """One connection per worker process, opened after the fork (a connection must never be
    shared across a fork) and before the worker subscribes."""
    conn = _connect()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(SCHEMA)
    ctx.state.db = conn
    ctx.log.info("sink_connected", server=conn.info.host, port=conn.info.port)


def teardown(ctx: WorkerContext) -> None:
    """After the last message was acknowledged: nothing is left to commit."""
    conn = getattr(ctx.state, "db", None)
    if conn is not None:
        conn.close()


def handle(message: Message) -> None:
    reading = message.json()
    if not isinstance(reading, dict) or not isinstance(reading.get("id"), str):
        raise PayloadError(f"payload on {message.topic!r} needs a text 'id'")
    row = (reading["id"], message.params["device_id"], reading.get("value"))
    ctx = message.context
    try:
        _insert(ctx.state.db, row)
    except psycopg.OperationalError:
        # the server restarted or the connection broke: one fresh connection, one more try.
        # If that fails too the exception fails the message (dead-lettered when configured).
        ctx.state.db.close()
        ctx.state.db = _connect()
        _insert(ctx.state.db, row)


def _insert(conn: psycopg.Connection[Any], row: tuple[Any, ...]) -> None:
    with conn.transaction():  # commits here, before the handler returns and routemqd acks
        conn.execute(INSERT, row)


def slow_log(message: Message, call_next: Any) -> Any:
    """Middleware: log the readings that took longer than 100 ms, with the worker's logger."""
    started = time.perf_counter()
    try:
        return call_next(message)
    finally:
        took = time.perf_counter() - started
        if took > 0.1:
            message.context.log.warning("slow_reading", topic=message.topic, seconds=round(took, 3))
