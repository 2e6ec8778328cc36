"""Hooks and middleware for the worker-hook tests: every call leaves one line in a journal.

The journal (``ROUTEMQD_TEST_HOOKS``) gets ``<what> <pid> <detail>`` lines with one O_APPEND
write each, so the order of lines across worker processes is the order the calls happened in.
Messages themselves go to the usual ledger (tests/handlers/ledger.py), which the handlers here
write only after checking that setup ran in this process (and, for async routes, that the
handler runs on the loop setup ran on): a handler that finds no setup fails its message.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from routemqd.context import WorkerContext
from routemqd.message import Message
from tests.handlers import ledger


def note(what: str, detail: str = "-") -> None:
    os.write(ledger.append_fd("ROUTEMQD_TEST_HOOKS"), f"{what} {os.getpid()} {detail}\n".encode())


def _ident(message: Message) -> str:
    return message.payload.decode("utf-8", "replace").partition(":")[0]


# ---------------------------------------------------------------------------------- hooks


def setup(ctx: WorkerContext) -> None:
    ctx.state.ready = True
    note("setup", ctx.label)


def teardown(ctx: WorkerContext) -> None:
    note("teardown", ctx.label)


async def setup_async(ctx: WorkerContext) -> None:
    ctx.state.loop = asyncio.get_running_loop()
    ctx.state.ready = True
    note("setup", ctx.label)


async def teardown_async(ctx: WorkerContext) -> None:
    same = asyncio.get_running_loop() is ctx.state.loop
    note("teardown", ctx.label if same else "other-loop")


def setup_raises(ctx: WorkerContext) -> None:
    raise ConnectionRefusedError("database at 127.0.0.1:9 refused the connection")


def setup_hangs(ctx: WorkerContext) -> None:
    threading.Event().wait()


def setup_slow(ctx: WorkerContext) -> None:
    """Longer than the route's heartbeat_timeout, shorter than its setup_timeout."""
    threading.Event().wait(float(os.environ.get("ROUTEMQD_TEST_SETUP_SLOW", "3")))
    setup(ctx)


# ------------------------------------------------------------------------------- handlers


def record(message: Message) -> None:
    if not getattr(message.context.state, "ready", False):
        raise RuntimeError("handler ran before setup")
    ledger.record(message)


async def record_async(message: Message) -> None:
    state = message.context.state
    if not getattr(state, "ready", False) or asyncio.get_running_loop() is not state.loop:
        raise RuntimeError("handler ran before setup, or not on setup's loop")
    ledger.record(message)


# ----------------------------------------------------------------------------- middleware


def _mw(name: str, message: Message, call_next: Any) -> Any:
    ident = _ident(message)
    note(f"{name}-in", ident)
    if message.payload.endswith(f":raise-in-{name}".encode()):
        raise ValueError(f"middleware {name} refused {ident}")
    result = call_next(message)
    note(f"{name}-out", ident)
    return result


async def _amw(name: str, message: Message, call_next: Any) -> Any:
    ident = _ident(message)
    note(f"{name}-in", ident)
    if message.payload.endswith(f":raise-in-{name}".encode()):
        raise ValueError(f"middleware {name} refused {ident}")
    await asyncio.sleep(0)  # really async: the chain must await, not call
    result = await call_next(message)
    note(f"{name}-out", ident)
    return result


def outer(message: Message, call_next: Any) -> Any:
    return _mw("outer", message, call_next)


def inner(message: Message, call_next: Any) -> Any:
    return _mw("inner", message, call_next)


async def outer_async(message: Message, call_next: Any) -> Any:
    return await _amw("outer", message, call_next)


async def inner_async(message: Message, call_next: Any) -> Any:
    return await _amw("inner", message, call_next)


def passthrough(message: Message, call_next: Any) -> Any:
    """The cheapest useful middleware (the benchmark's 'one trivial middleware')."""
    return call_next(message)
