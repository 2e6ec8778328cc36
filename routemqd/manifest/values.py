"""Single values: text, flags, whole numbers in a range, durations, sizes, percentages, QoS.

Each converter takes ``(ctx, node, field name)`` and returns the value or raises the
:class:`~routemqd.manifest.nodes.ManifestError` that names the node's line and the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import yaml

from routemqd.manifest.nodes import Ctx, plain, show
from routemqd.topics import (
    TopicError,
    validate_group,
)
from routemqd.units import UnitError, parse_duration, parse_size

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def as_str(ctx: Ctx, node: yaml.Node, fname: str) -> str:
    v = plain(ctx, node, fname)
    if not isinstance(v, str) or not v:
        raise ctx.error(node, fname, f"expected non-empty text, got {show(v)}")
    if "\0" in v:
        raise ctx.error(node, fname, "must not contain a NUL character")
    return v


def as_opt_str(ctx: Ctx, node: yaml.Node, fname: str) -> str | None:
    v = plain(ctx, node, fname)
    if v is None:
        return None
    return as_str(ctx, node, fname)


def as_bool(ctx: Ctx, node: yaml.Node, fname: str) -> bool:
    v = plain(ctx, node, fname)
    if not isinstance(v, bool):
        raise ctx.error(node, fname, f"expected true or false, got {show(v)}")
    return v


def int_between(lo: int, hi: int | None) -> Callable[[Ctx, yaml.Node, str], int]:
    def convert(ctx: Ctx, node: yaml.Node, fname: str) -> int:
        v = plain(ctx, node, fname)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ctx.error(node, fname, f"expected a whole number, got {show(v)}")
        if v < lo or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ctx.error(node, fname, f"must be {rng}, got {v}")
        return v

    return convert


def as_duration(lo: float = 0.0, allow_none: bool = False) -> Callable[..., Any]:
    def convert(ctx: Ctx, node: yaml.Node, fname: str) -> float | None:
        v = plain(ctx, node, fname)
        if v is None and allow_none:
            return None
        try:
            seconds = parse_duration(v)
        except UnitError as e:
            raise ctx.error(node, fname, str(e)) from None
        if seconds < lo:
            raise ctx.error(node, fname, f"must be at least {lo:g}s, got {v!r}")
        return seconds

    return convert


def as_size_or_none(ctx: Ctx, node: yaml.Node, fname: str) -> int | None:
    v = plain(ctx, node, fname)
    if v is None:
        return None
    try:
        n = parse_size(v)
    except UnitError as e:
        raise ctx.error(node, fname, str(e)) from None
    if n < 1024 * 1024:
        raise ctx.error(node, fname, f"at least 1MiB makes sense for a worker, got {v!r}")
    return n


def as_percent_or_none(ctx: Ctx, node: yaml.Node, fname: str) -> float | None:
    v = plain(ctx, node, fname)
    if v is None:
        return None
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            v = float(v.strip()[:-1])
        except ValueError:
            raise ctx.error(
                node, fname, f"expected a CPU percentage such as 90, got {v!r}"
            ) from None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 100 * os.cpu_count():
        raise ctx.error(node, fname, f"expected a CPU percentage such as 90, got {show(v)}")
    return float(v)


def as_qos(ctx: Ctx, node: yaml.Node, fname: str) -> int:
    return int_between(0, 2)(ctx, node, fname)


def as_protocol(ctx: Ctx, node: yaml.Node, fname: str) -> int:
    v = plain(ctx, node, fname)
    accepted = {5: 5, "5": 5, "5.0": 5, 4: 4, 311: 4, "3.1.1": 4, "311": 4, "4": 4}
    if isinstance(v, bool) or v not in accepted:
        raise ctx.error(node, fname, f"expected 5 (MQTT 5) or 3.1.1, got {show(v)}")
    return accepted[v]


def as_fraction(ctx: Ctx, node: yaml.Node, fname: str) -> float:
    """A percentage, ``80`` or ``80%``, as a fraction. ``0.8`` is refused rather than guessed."""
    v = plain(ctx, node, fname)
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            v = float(v.strip()[:-1])
        except ValueError:
            raise ctx.error(node, fname, f"expected a percentage such as 80%, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v <= 100:
        raise ctx.error(
            node, fname, f"expected a percentage between 1 and 100 such as 80%, got {show(v)}"
        )
    return float(v) / 100.0


def as_group(ctx: Ctx, node: yaml.Node, fname: str) -> str:
    v = as_str(ctx, node, fname)
    try:
        return validate_group(v)
    except TopicError as e:
        raise ctx.error(node, fname, str(e)) from None


def sanitize_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:64]
