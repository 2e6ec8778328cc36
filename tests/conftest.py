"""Shared fixtures: real mosquitto brokers that never outlive the test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker
from tests.support.processes import stop_tracked
from tests.support.traffic import Publisher


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_processes() -> Iterator[None]:
    """Safety net: stop every process a helper started and nobody stopped.

    Fixture teardown normally stops brokers; this catches helpers used
    outside fixtures and teardowns that failed half way.
    """
    yield
    stop_tracked()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh, running broker with its own port and persistence in tmp_path."""
    instance = Broker(workdir=tmp_path / "broker")
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    """Publishers a test made (append them); each is closed at teardown."""
    made: list[Publisher] = []
    yield made
    for p in made:
        p.close()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Make several brokers: ``broker_factory(start=True, **Broker kwargs)``.

    Each gets its own workdir under tmp_path; all are stopped at teardown.
    """
    created: list[Broker] = []

    def make(*, start: bool = True, **kwargs: Any) -> Broker:
        kwargs.setdefault("workdir", tmp_path / f"broker-{len(created)}")
        instance = Broker(**kwargs)
        created.append(instance)
        if start:
            instance.start()
        return instance

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for instance in created:
            try:
                instance.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Any]]:
    """Start ``routemqd run`` processes: ``daemon_factory(manifest_path, env=...)``.

    Every daemon and every worker PID it reported is stopped at teardown, by PID.
    """
    from tests.support.daemon import Daemon

    started: list[Daemon] = []

    def make(
        manifest: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Daemon:
        d = Daemon(manifest, env=env, args=args)
        started.append(d)
        return d

    try:
        yield make
    finally:
        for d in started:
            d.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One private PostgreSQL for the session (initdb costs seconds); tests take a database each
    through ``postgres_dsn``. Never the machine's own server."""
    from tests.support.postgres import Postgres

    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_dsn(postgres_server: Any, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the session's server; its DSN."""
    import re
    import uuid

    base = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return str(postgres_server.create_database(f"t_{base}_{uuid.uuid4().hex[:8]}"))
