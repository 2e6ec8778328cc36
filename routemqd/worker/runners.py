"""Runners: who calls the handler, and on which thread.

- ``InlineRunner`` (sync handler, concurrency 1, the default): on the socket thread, inside
  paho's ``on_message``; the PUBACK is queued as soon as the handler returns. No hand-off.
- ``PoolRunner`` (sync, concurrency > 1): N threads. The socket thread collects what one pass
  read and hands it over as one batch (one wake-up per batch, not per message).
- ``AsyncRunner`` (``async def``): coroutines on the event loop that also drives the socket.

``build_handler`` is the one place the callable a runner calls is made: the handler wrapped in
its route's middleware chain, or the bare handler when the route has none.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from routemqd.handlers import LoadedHandler
from routemqd.middleware import Middleware, build_chain
from routemqd.worker.delivery import Acknowledger, Delivery
from routemqd.worker.stats import RunnerState

QOS0_INBOX_LIMIT = 10_000  # QoS 0 has no flow control; past this we drop rather than grow
QOS0_INBOX_BYTES = 64 * 1024 * 1024  # ... and past this many payload bytes waiting


def build_handler(
    loaded: LoadedHandler, middleware: Sequence[Middleware] = ()
) -> Callable[[Any], Any]:
    """The callable runners call with each Message, made once per worker. Without middleware it
    is the handler function itself: the hot path has no extra call. An exception anywhere in the
    chain reaches the runner like the handler's own, so it fails the message (logged,
    dead-lettered, acknowledged)."""
    return build_chain(loaded.func, middleware, loaded.is_async)


class Qos0Budget:
    """Bound what QoS 0 queues by count and by bytes: a flood of large messages faster than the
    handler would otherwise grow the worker without limit. One message always fits. Only
    runners that queue need it; the inline runner never holds more than one message."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued = 0
        self.bytes = 0

    def take(self, size: int) -> bool:
        with self.lock:
            if self.queued and (
                self.queued >= QOS0_INBOX_LIMIT or self.bytes + size > QOS0_INBOX_BYTES
            ):
                return False
            self.queued += 1
            self.bytes += size
            return True

    def give(self, size: int) -> None:
        with self.lock:
            self.queued -= 1
            self.bytes -= size


def call(func: Callable[[Any], Any], message: Any) -> BaseException | None:
    """Run a sync handler; what it raised (anything, even SystemExit) belongs to its message."""
    try:
        func(message)
    except BaseException as e:
        return e
    return None


def dequeued(
    budget: Qos0Budget, acks: Acknowledger, state: RunnerState, raw: Any
) -> Delivery | None:
    """A queued message leaves the queue (its QoS 0 budget back) and begins: its Delivery, or
    None when the acknowledger gave it up as a known worker-killer."""
    if raw.qos == 0:
        budget.give(len(raw.payload))
    return acks.begin(state, raw)


class InlineRunner:
    def __init__(self, func: Callable[[Any], Any], acks: Acknowledger) -> None:
        self.func = func
        self.acks = acks
        self.states = [RunnerState(cell=0)]

    def start(self) -> None:
        self.states[0].busy_thread = threading.get_ident()

    def submit(self, raw: Any) -> bool:
        """Run the handler now (socket thread, link lock held). Always accepted."""
        state = self.states[0]
        if state.busy_thread != threading.get_ident():
            state.busy_thread = threading.get_ident()
        d = self.acks.begin(state, raw)
        if d is None:
            return True
        # the keepalive guard may use the socket meanwhile
        self.acks.finish(d, self.acks.link.run_unlocked(self.func, d.message))
        return True

    def flush(self) -> None:
        pass

    def queued(self) -> int:
        return 0

    def stop(self, timeout: float) -> None:
        pass


_STOP = object()


class PoolRunner:
    def __init__(self, func: Callable[[Any], Any], acks: Acknowledger, n: int) -> None:
        self.func = func
        self.acks = acks
        self.states = [RunnerState(cell=i) for i in range(n)]
        self.budget = Qos0Budget()
        self._batch: list[Any] = []
        self._inbox: deque[Any] = deque()
        self._cond = threading.Condition()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for i, state in enumerate(self.states):
            t = threading.Thread(target=self._run, args=(state,), name=f"handler-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def submit(self, raw: Any) -> bool:
        """Collect for the next hand-over (socket thread). False: a QoS 0 message dropped."""
        if raw.qos == 0 and not self.budget.take(len(raw.payload)):
            return False
        self._batch.append(raw)
        return True

    def flush(self) -> None:
        """Hand what this pass read to the runners at once (socket thread)."""
        if self._batch:
            batch, self._batch = self._batch, []
            with self._cond:
                self._inbox.extend(batch)
                self._cond.notify(len(batch))

    def queued(self) -> int:
        return len(self._inbox) + len(self._batch)

    def _run(self, state: RunnerState) -> None:
        state.busy_thread = threading.get_ident()
        func, acks, inbox, cond = self.func, self.acks, self._inbox, self._cond
        while True:
            with cond:
                while not inbox:
                    cond.wait()
                raw = inbox.popleft()
            if raw is _STOP:
                return
            d = dequeued(self.budget, acks, state, raw)
            if d is not None:
                acks.finish(d, call(func, d.message))

    def stop(self, timeout: float) -> None:
        """Finish what is queued, then end the threads (within ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._inbox.extend([_STOP] * len(self.threads))
            self._cond.notify_all()
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


class AsyncRunner:
    """Coroutines on the loop that drives the socket; ``submit`` runs on that loop."""

    def __init__(self, func: Callable[[Any], Any], acks: Acknowledger, n: int) -> None:
        self.func = func
        self.acks = acks
        self.states = [RunnerState(cell=i) for i in range(n)]
        self.budget = Qos0Budget()
        self.queue: asyncio.Queue[Any] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """On the loop's thread, with the loop running."""
        self.queue = asyncio.Queue()
        self.tasks = [asyncio.ensure_future(self._consume(s)) for s in self.states]

    def submit(self, raw: Any) -> bool:
        if raw.qos == 0 and not self.budget.take(len(raw.payload)):
            return False
        assert self.queue is not None
        self.queue.put_nowait(raw)
        return True

    def flush(self) -> None:
        pass

    def queued(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def _consume(self, state: RunnerState) -> None:
        state.busy_thread = threading.get_ident()
        assert self.queue is not None
        acks, func = self.acks, self.func
        while True:
            raw = await self.queue.get()
            if raw is _STOP:
                return
            d = dequeued(self.budget, acks, state, raw)
            if d is None:
                continue
            error: BaseException | None = None
            try:
                await func(d.message)
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError):
                    raise
                error = e
            acks.finish(d, error)

    async def drain(self) -> None:
        """Finish what is queued, then end the consumers."""
        assert self.queue is not None
        for _ in self.tasks:
            self.queue.put_nowait(_STOP)
        await asyncio.gather(*self.tasks, return_exceptions=True)
