"""A route's ``setup``, ``teardown`` and ``middleware``: loading, the kind rules, bounded runs.

Shared by the worker (which runs them) and the ``check`` child (which only imports and inspects
them: a hook is never called by ``check``, so checking a manifest opens no database connection).

Kinds. An async handler runs on the worker's event loop, so its middleware must be ``async def``
(it awaits ``call_next(message)``) and may open loop-bound resources in an ``async def`` setup.
A sync handler has no event loop: its middleware and hooks are plain functions. A plain setup or
teardown is fine for an async handler too (it runs before the first message, after the last).
Anything else cannot work and is refused by ``check`` and at boot: see :func:`kind_problem`.

Bounds. ``setup`` runs on the caller's thread (so a resource that must stay on one thread, such
as a default ``sqlite3`` connection, is made where the handler will use it) under a watchdog
thread: past ``setup_timeout`` the watchdog reports the failure and ends the process with
``SETUP_FAILED``, since a hung ``connect()`` in C code cannot be interrupted any other way and a
process that might still finish booting must not stay around. ``teardown`` is bounded the same
way by ``teardown_timeout`` and exits with ``TEARDOWN_TIMEOUT``; it runs after the last message
was acknowledged, so a hung teardown costs nothing but its own cleanup.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from routemqd.context import WorkerContext
from routemqd.exitcodes import ExitCode
from routemqd.handlers import HandlerError, is_async_callable, resolve
from routemqd.manifest import Route


class HookRole(StrEnum):
    SETUP = "setup"
    TEARDOWN = "teardown"
    MIDDLEWARE = "middleware"


_ARGS: dict[HookRole, tuple[int, str]] = {
    HookRole.SETUP: (1, "exactly one argument (the worker context)"),
    HookRole.TEARDOWN: (1, "exactly one argument (the worker context)"),
    HookRole.MIDDLEWARE: (2, "exactly two arguments (message, call_next)"),
}


@dataclass(frozen=True)
class LoadedHook:
    role: HookRole
    ref: str
    func: Callable[..., Any]
    is_async: bool


@dataclass(frozen=True)
class RouteHooks:
    """What a worker loaded for its route; empty for a route without hooks."""

    setup: LoadedHook | None = None
    teardown: LoadedHook | None = None
    middleware: tuple[LoadedHook, ...] = ()


@dataclass(frozen=True)
class HookFailure:
    """A hook went wrong: the exit code the worker ends with, and the text for status and log."""

    code: ExitCode
    reason: str
    detail: str = ""


def load_hook(role: HookRole | str, ref: str, python_path: tuple[str, ...] = ()) -> LoadedHook:
    """Import one hook and check its signature; HandlerError (``import``/``invalid``) if unusable.
    Never calls it."""
    role = HookRole(role)
    func = resolve(ref, python_path, str(role))
    count, wanted = _ARGS[role]
    try:
        inspect.signature(func).bind(*([object()] * count))
    except TypeError:
        raise HandlerError("invalid", f"{role} {ref}: must accept {wanted}") from None
    except ValueError:
        pass  # builtins without a signature: trust them
    return LoadedHook(role=role, ref=ref, func=func, is_async=is_async_callable(func))


def kind_problem(role: HookRole | str, hook_is_async: bool, handler_is_async: bool) -> str:
    """Why this hook cannot work with a handler of this kind; "" when it can."""
    role = HookRole(role)
    if role is HookRole.MIDDLEWARE:
        if handler_is_async and not hook_is_async:
            return (
                "the handler is async, so middleware must be 'async def' and "
                "'await call_next(message)'"
            )
        if hook_is_async and not handler_is_async:
            return (
                "the handler is a plain function, so middleware must be one too "
                "(an async middleware would need an event loop the route does not run)"
            )
        return ""
    if hook_is_async and not handler_is_async:
        return (
            f"an async {role} runs on the handler's event loop, and a plain-function handler has "
            f"none; make the {role} a plain function"
        )
    return ""


def load_route_hooks(
    route: Route, python_path: tuple[str, ...], handler_is_async: bool
) -> RouteHooks:
    """Load every hook of ``route`` and apply the kind rules, as ``check`` did. HandlerError
    (the worker's HANDLER_IMPORT_FAILED / HANDLER_INVALID) names the manifest field."""
    loaded: dict[str, list[LoadedHook]] = {role.value: [] for role in HookRole}
    for role, ref in route.hooks:
        try:
            hook = load_hook(role, ref.ref, python_path)
        except HandlerError as e:
            raise HandlerError(e.kind, f"{ref.field}: {e}", e.detail) from None
        problem = kind_problem(role, hook.is_async, handler_is_async)
        if problem:
            raise HandlerError("invalid", f"{ref.field}: {role} {ref.ref}: {problem}")
        loaded[role].append(hook)
    return RouteHooks(
        setup=next(iter(loaded[HookRole.SETUP]), None),
        teardown=next(iter(loaded[HookRole.TEARDOWN]), None),
        middleware=tuple(loaded[HookRole.MIDDLEWARE]),
    )


# ------------------------------------------------------------------------------- bounded runs


def run_setup(
    hook: LoadedHook | None,
    ctx: WorkerContext,
    timeout: float,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    on_timeout: Callable[[HookFailure], None] | None = None,
    exit_fn: Callable[[int], Any] = os._exit,
) -> HookFailure | None:
    """Run ``setup(ctx)`` once; None when it returned, a SETUP_FAILED failure when it raised.

    Past ``timeout`` the watchdog calls ``on_timeout(failure)`` (emit ``boot_error``, log) and
    then ``exit_fn(SETUP_FAILED)``: the process ends there. An async setup runs on ``loop``:
    with ``run_until_complete`` if the loop is not running yet, else handed to the thread
    running it. Call it from a thread that is not running ``loop``."""
    return _bounded(
        hook, ctx, timeout, ExitCode.SETUP_FAILED, ExitCode.SETUP_FAILED, loop, on_timeout, exit_fn
    )


def run_teardown(
    hook: LoadedHook | None,
    ctx: WorkerContext,
    timeout: float,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    on_timeout: Callable[[HookFailure], None] | None = None,
    exit_fn: Callable[[int], Any] = os._exit,
) -> HookFailure | None:
    """Run ``teardown(ctx)`` once; None when it returned, a failure (exit code OK: the work was
    done) when it raised. Past ``timeout``: ``on_timeout(failure)``, then
    ``exit_fn(TEARDOWN_TIMEOUT)``. Call it after the last message was acknowledged and the
    client disconnected, with the event loop of an async route still open."""
    return _bounded(
        hook, ctx, timeout, ExitCode.OK, ExitCode.TEARDOWN_TIMEOUT, loop, on_timeout, exit_fn
    )


def _bounded(
    hook: LoadedHook | None,
    ctx: WorkerContext,
    timeout: float,
    raised: ExitCode,
    hung: ExitCode,
    loop: asyncio.AbstractEventLoop | None,
    on_timeout: Callable[[HookFailure], None] | None,
    exit_fn: Callable[[int], Any],
) -> HookFailure | None:
    if hook is None:
        return None
    failure = HookFailure(hung, f"{hook.role} {hook.ref} did not finish within {timeout:g}s")
    with _Watchdog(timeout, failure, on_timeout, exit_fn) as dog:
        try:
            _call(hook, ctx, loop)
        except BaseException as e:  # a hook may sys.exit() or raise anything
            if isinstance(e, KeyboardInterrupt):
                raise
            if dog.disarm():
                return HookFailure(
                    raised,
                    f"{hook.role} {hook.ref} raised {type(e).__name__}: {e}",
                    traceback.format_exc(limit=-8),
                )
    return failure if dog.fired else None


def _call(hook: LoadedHook, ctx: WorkerContext, loop: asyncio.AbstractEventLoop | None) -> Any:
    if not hook.is_async:
        return hook.func(ctx)
    if loop is None:
        raise RuntimeError(f"{hook.role} {hook.ref} is async and needs the route's event loop")
    if loop.is_running():
        if asyncio._get_running_loop() is loop:
            raise RuntimeError(f"{hook.role} {hook.ref}: called on the loop's own thread")
        return asyncio.run_coroutine_threadsafe(hook.func(ctx), loop).result()
    return loop.run_until_complete(hook.func(ctx))


class _Watchdog:
    """Ends the process if the guarded block outlives ``timeout``; exactly one of "the block
    finished" and "the bound fired" wins, under a lock."""

    def __init__(
        self,
        timeout: float,
        failure: HookFailure,
        on_timeout: Callable[[HookFailure], None] | None,
        exit_fn: Callable[[int], Any],
    ) -> None:
        self.timeout = timeout
        self.failure = failure
        self.on_timeout = on_timeout
        self.exit_fn = exit_fn
        self.fired = False
        self._finished = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="routemqd-hook-bound", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()

    def disarm(self) -> bool:
        """The block is over; False if the bound fired first (the process is on its way out)."""
        with self._lock:
            self._finished = True
        self._wake.set()
        return not self.fired

    def _run(self) -> None:
        if self._wake.wait(self.timeout):
            return
        with self._lock:
            if self._finished:
                return
            self.fired = True
        try:
            if self.on_timeout is not None:
                self.on_timeout(self.failure)
        except Exception:  # the process ends either way; a broken pipe must not keep it alive
            pass
        self.exit_fn(int(self.failure.code))
