"""Resolve ``package.module:function`` to a callable, in the process that will run it.

Only workers and the ``check`` child call this: the master never imports user code (a handler
that fails to import, or has side effects at import, must only ever hurt its own pool).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class HandlerError(Exception):
    """The handler cannot be used; ``kind`` is ``import`` or ``invalid``; str() is for humans."""

    def __init__(self, kind: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class LoadedHandler:
    ref: str
    func: Callable[[Any], Any]
    is_async: bool


def load_handler(ref: str, python_path: tuple[str, ...] = ()) -> LoadedHandler:
    obj = resolve(ref, python_path, "handler")
    try:
        inspect.signature(obj).bind(object())
    except TypeError:
        raise HandlerError(
            "invalid", f"handler {ref}: must accept exactly one argument (the message)"
        ) from None
    except ValueError:
        pass  # builtins without a signature: trust them
    return LoadedHandler(ref=ref, func=obj, is_async=is_async_callable(obj))


def resolve(ref: str, python_path: tuple[str, ...], what: str) -> Any:
    """Import the module and walk the attribute path; ``what`` (handler, setup...) names it."""
    for entry in reversed(python_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as e:  # a module may sys.exit() or raise anything while importing
        if isinstance(e, KeyboardInterrupt):
            raise
        raise HandlerError(
            "import",
            f"{what} {ref}: importing {module_name} failed: {type(e).__name__}: {e}",
            traceback.format_exc(limit=-8),
        ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerError(
                "invalid", f"{what} {ref}: {module_name} has no attribute {attr_path!r}"
            ) from None
    if not callable(obj):
        raise HandlerError("invalid", f"{what} {ref}: {type(obj).__name__} is not callable")
    return obj


def is_async_callable(obj: Any) -> bool:
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )


def probe_main(argv: list[str]) -> int:
    """Child-process entry for ``routemqd check``: import each handler, print one JSON line each.

    Runs in a fresh interpreter so that importing user code can never affect the caller. An
    argument ``role=package.module:function`` is a hook (setup, teardown, middleware): imported
    and inspected, never called.
    """
    import json

    from routemqd.hooks import load_hook

    python_path = tuple(
        p for p in os.environ.get("ROUTEMQD_PYTHON_PATH", "").split(os.pathsep) if p
    )
    for arg in argv:
        role, _, ref = arg.rpartition("=")
        try:
            if role:
                is_async = load_hook(role, ref, python_path).is_async
            else:
                is_async = load_handler(ref, python_path).is_async
            result = {"ref": ref, "role": role, "ok": True, "async": is_async}
        except HandlerError as e:
            result = {"ref": ref, "role": role, "ok": False, "kind": e.kind, "error": str(e)}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    # run through the imported module, not ``__main__``: routemqd.hooks raises the HandlerError
    # of ``routemqd.handlers``, which a ``__main__`` copy of the class would not catch
    from routemqd.handlers import probe_main as _probe_main

    raise SystemExit(_probe_main(sys.argv[1:]))
