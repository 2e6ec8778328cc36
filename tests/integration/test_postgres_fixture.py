"""The test PostgreSQL: a private server on a loopback port, reachable, and gone after stop."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from tests.support.postgres import Postgres
from tests.support.processes import _is_gone, tracked_pids


def test_private_server_serves_commits_and_stops_by_pid() -> None:
    server = Postgres()
    try:
        server.start()
        assert server.port not in (0, 5432)
        assert server.pid is not None and server.pid in tracked_pids()
        with psycopg.connect(server.dsn(), connect_timeout=5) as conn:
            addr = conn.execute("SELECT inet_server_addr()::text, current_setting('port')")
            assert addr.fetchone() == ("127.0.0.1/32", str(server.port))
            data_dir = conn.execute("SHOW data_directory").fetchone()
            assert data_dir == (str(server.data_dir),)
        assert (server.workdir / f".s.PGSQL.{server.port}").exists()  # type: ignore[operator]
        pid = server.pid
        server.stop()
        assert pid not in tracked_pids()
        assert _is_gone(pid)  # gone, or a zombie its reaper has not collected yet
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    finally:
        server.close()
    assert server.workdir is not None and not server.workdir.exists()


def test_stop_with_a_client_still_connected_is_prompt() -> None:
    with Postgres() as server:
        conn = psycopg.connect(server.dsn(), connect_timeout=5)
        conn.execute("BEGIN")
        started = time.monotonic()
        server.stop(timeout=20)
        assert time.monotonic() - started < 10  # fast shutdown, not a smart one
        conn.close()


def test_session_databases_are_separate(postgres_dsn: str, postgres_server: Postgres) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE only_here (id int)")
        conn.commit()
    other = postgres_server.create_database("t_fixture_other")
    with psycopg.connect(other) as conn:
        found = conn.execute("SELECT to_regclass('only_here')").fetchone()
        assert found == (None,)
