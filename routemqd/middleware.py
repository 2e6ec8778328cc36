"""Wrap a handler in its route's middleware, once per worker, outermost first.

A middleware is ``function(message, call_next)``: it may work before and after
``call_next(message)``, replace the result, or not call it at all (the message then counts as
handled and is acknowledged). For an async handler every middleware is ``async def`` and
``await``s ``call_next(message)``; for a sync handler every middleware is a plain function. Which
mixes are refused, and why, is :func:`routemqd.hooks.kind_problem`.

The chain is built once when the worker boots, not per message: each layer is one closure that
holds the next, so a delivery through N middleware costs N plain calls. A route with no
middleware gets its handler back unchanged: the delivery path cannot tell it was ever asked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Handler = Callable[[Any], Any]
Middleware = Callable[[Any, Handler], Any]


def build_chain(handler: Handler, middleware: Sequence[Middleware], is_async: bool) -> Handler:
    """``middleware[0](message, -> middleware[1](message, -> ... handler(message)))``.

    ``is_async`` is the handler's kind (the middleware were checked to match it): the chain is
    then an ``async def`` itself, so whoever runs it needs no second look."""
    call = handler
    for mw in reversed(middleware):
        call = _async_layer(mw, call) if is_async else _sync_layer(mw, call)
    return call


def _sync_layer(mw: Middleware, call_next: Handler) -> Handler:
    def layer(message: Any) -> Any:
        return mw(message, call_next)

    layer.__qualname__ = f"middleware({_name(mw)})"
    return layer


def _async_layer(mw: Middleware, call_next: Handler) -> Callable[[Any], Awaitable[Any]]:
    async def layer(message: Any) -> Any:
        return await mw(message, call_next)

    layer.__qualname__ = f"middleware({_name(mw)})"
    return layer


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
