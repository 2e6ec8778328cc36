"""The consuming side of a worker: the link, the acknowledger, a runner and the socket driver,
wired together; what the link reports lands here (``Link`` calls these ``on_*`` methods).

The process around it (signals, the master's commands, heartbeats, when to stop) is
:mod:`routemqd.worker.lifecycle`; this module knows how to start consuming and how to stop
without losing anything: retire (leave the group), drain (finish what is in flight and its
PUBACKs), close (DISCONNECT, keeping or ending the session).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from routemqd.board import InflightBoard
from routemqd.exitcodes import ExitCode
from routemqd.handlers import LoadedHandler
from routemqd.middleware import Middleware
from routemqd.plan import SlotSpec
from routemqd.worker.delivery import Acknowledger
from routemqd.worker.drivers import AsyncioDriver, Backoff, SelectDriver
from routemqd.worker.link import Link
from routemqd.worker.runners import AsyncRunner, InlineRunner, PoolRunner, build_handler
from routemqd.worker.stats import RunnerState

RETIRE_IDLE = 0.5  # quiet time after UNSUBACK before ending the session (docs/BROKER-FACTS.md)


class Host(Protocol):
    """What the consumer needs from the process around it."""

    boot_failure: tuple[ExitCode, str] | None

    def boot_fail(self, code: ExitCode, reason: str) -> None: ...
    def wake(self) -> None: ...


class Consumer:
    def __init__(
        self,
        spec: SlotSpec,
        handler: LoadedHandler,
        host: Host,
        log: Any,
        board: InflightBoard | None = None,
        attempts: Mapping[bytes, int] | None = None,
        middleware: Sequence[Middleware] = (),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``loop``: the event loop an async route's setup already ran on (the worker owns and
        closes it, so teardown can run on it after the socket thread ended); None makes one."""
        self.spec = spec
        self.route = spec.route
        self.handler = handler
        self.host = host
        self.log = log
        self.board = board
        self.attempts = attempts
        self.middleware = tuple(middleware)
        self.loop = loop
        self.link: Link | None = None
        self.acks: Acknowledger | None = None
        self.runner: InlineRunner | PoolRunner | AsyncRunner | None = None
        self.driver: SelectDriver | AsyncioDriver | None = None
        self.backoff = Backoff(spec.broker.reconnect_min, spec.broker.reconnect_max)
        self.async_thread: threading.Thread | None = None
        self.async_stop: asyncio.Future[None] | None = None
        self.drained = threading.Event()
        self.accepting = True
        self.subscribed = False
        self.unsubscribed = False
        self.connected_at = 0.0
        self.stopping = False
        self.received = 0
        self.dropped = 0
        self.redelivered = 0
        self.last_message_at = time.monotonic()

    @property
    def states(self) -> list[RunnerState]:
        return self.runner.states if self.runner is not None else []

    # ----------------------------------------------------------------- start the socket

    def start(self) -> None:
        assert self.handler is not None
        try:
            self.link = link = Link(self.spec, self)
        except (ssl.SSLError, OSError) as e:
            # tls_set loads the CA and client certificate files: a bad file fails every restart
            reason = f"TLS set-up failed: cannot load the CA or client certificate files: {e}"
            self.host.boot_fail(ExitCode.TLS_FAILED, reason)
            return
        self.acks = acks = Acknowledger(link, self.route, self.log, self.board, self.attempts)
        func = build_handler(self.handler, self.middleware)
        try:
            link.connect()
        except ssl.SSLError as e:
            b = self.spec.broker
            self.host.boot_fail(
                ExitCode.TLS_FAILED, f"TLS handshake with {b.host}:{b.port} failed: {e}"
            )
            return
        except OSError as e:
            b = self.spec.broker
            self.log.warning("broker_unreachable", reason=str(e), host=b.host, port=b.port)
        n = self.route.concurrency
        if self.handler.is_async:
            self.runner = AsyncRunner(func, acks, n)
            ready = threading.Event()
            self.async_thread = threading.Thread(
                target=self._async_main, args=(ready,), name="mqtt", daemon=True
            )
            self.async_thread.start()
            ready.wait(5)
            return
        if n == 1:
            self.runner = InlineRunner(func, acks)
        else:
            self.runner = PoolRunner(func, acks, n)
        self.runner.start()
        runner = self.runner

        def after_pass() -> None:
            if not acks.idle():
                acks.settle()
            runner.flush()

        self.driver = SelectDriver(link, after_pass, self.backoff)
        self.driver.start()

    def _async_main(self, ready: threading.Event) -> None:
        assert self.link is not None and isinstance(self.runner, AsyncRunner)
        loop = self.loop or asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        acks = self.acks
        assert acks is not None

        def after_pass() -> None:
            if not acks.idle():
                acks.settle()

        driver = self.driver = AsyncioDriver(self.link, loop, self.backoff, after_pass)
        runner = self.runner

        async def main() -> None:
            self.async_stop = loop.create_future()
            driver.start()
            runner.start()
            ready.set()
            await self.async_stop
            await runner.drain()
            self.drained.set()
            await driver.closed
            driver.stop()

        try:
            loop.run_until_complete(main())
        finally:
            if self.loop is None:
                loop.close()

    # ---------------------------------------------------------------- link observer

    def on_connected(self, session_present: bool) -> None:
        self.backoff.reset()
        self.connected_at = time.monotonic()
        self.log.info("connected", session_present=session_present, client_id=self.spec.client_id)

    def on_refused(self, reason: str, auth: bool) -> None:
        if auth:
            self.host.boot_fail(
                ExitCode.BROKER_AUTH_REFUSED, f"broker refused the connection: {reason}"
            )
            assert self.link is not None
            self.link.close(end_session=False)
        else:
            self.log.warning("connect_refused", reason=reason)

    def on_subscribed(self, failure: str | None) -> None:
        if failure is not None:
            self.host.boot_fail(
                ExitCode.SUBSCRIBE_REFUSED,
                f"broker refused the subscription {self.route.subscription!r}: {failure}",
            )
            return
        self.subscribed = True
        self.host.wake()

    def on_unsubscribed(self) -> None:
        self.unsubscribed = True
        self.host.wake()

    def on_disconnected(self, reason: str) -> None:
        self.subscribed = False
        self.unsubscribed = False
        if self.acks is not None:
            self.acks.connection_lost()
        if not self.stopping and self.host.boot_failure is None:
            self.log.warning("disconnected", reason=reason)

    def on_problem(self) -> None:
        # the main thread heartbeats a changed problem at once: status and systemd's STATUS=
        # say why the worker is not ready without waiting for the next tick
        self.host.wake()

    def on_message(self, raw: Any) -> None:
        self.received += 1
        self.last_message_at = time.monotonic()
        if raw.dup:
            self.redelivered += 1
        if not self.accepting:
            # Not acked: it stays in this slot's session and the next worker gets it.
            if raw.qos == 0:
                self.dropped += 1
            return
        assert self.runner is not None and self.acks is not None
        if raw.qos > 0:
            self.acks.unacked += 1
        if not self.runner.submit(raw):
            self.dropped += 1

    def idle(self) -> bool:
        assert self.runner is not None and self.acks is not None
        return (
            self.runner.queued() == 0
            and all(s.busy_since is None for s in self.states)
            and self.acks.idle()
        )

    def retire(self, deadline: float) -> bool:
        """Leave the group without stranding anything: UNSUBSCRIBE, wait for UNSUBACK, handle what
        is still in flight, stay idle a moment. True when that happened on a live connection, so
        the caller may end the session; False (broker away until the deadline) keeps the session
        for whoever resumes this client id, rather than dropping what it holds."""
        link = self.link
        assert link is not None
        link.retiring = True
        if link.connected:
            self.unsubscribed = False
            link.unsubscribe()
        while time.monotonic() < deadline:
            now = time.monotonic()
            if (
                link.connected
                and self.unsubscribed
                # after a reconnect the broker first resends what was in flight
                and now - self.connected_at >= RETIRE_IDLE
                and now - self.last_message_at >= RETIRE_IDLE
                and self.idle()
            ):
                return True
            time.sleep(0.05)
        self.log.warning(
            "retire_incomplete",
            reason="the broker was not reachable long enough to leave cleanly; "
            "the session is kept for the next worker with this client id",
        )
        return False

    def drain(self, deadline: float) -> None:
        """Finish what is in flight (not taking new messages) and wait for its PUBACKs out."""
        runner = self.runner
        if isinstance(runner, PoolRunner):
            runner.stop(max(0.0, deadline - time.monotonic()))
        elif isinstance(runner, AsyncRunner) and self.driver is not None:
            loop = self.driver.loop  # type: ignore[union-attr]
            stop = self.async_stop
            if stop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))
                self.drained.wait(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and runner is not None and not self.idle():
            time.sleep(0.02)

    def close(self, end_session: bool, deadline: float) -> bool:
        """Disconnect; True when the session was ended on the broker (asked, and connected)."""
        link = self.link
        if link is None:
            return False
        connected = link.connected
        link.close(end_session=end_session)
        thread = self.async_thread or (
            self.driver.thread if isinstance(self.driver, SelectDriver) else None
        )
        if thread is not None:
            thread.join(max(0.1, deadline - time.monotonic()))
        link.drop()
        if not (connected and end_session):
            return False
        if self.spec.broker.protocol != 5:
            failed = link.end_session_311()
            if failed is not None:
                self.log.warning("session_not_ended", reason=failed)
                return False
        return True
